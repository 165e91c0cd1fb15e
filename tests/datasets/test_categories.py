"""The one rule that names the category of a RefSegRS-style phrase."""

from __future__ import annotations

import pytest

from rsrefseg.datasets.categories import phrase_category

CASES = {
    "vehicle": "vehicle",
    "vehicle in the parking area": "vehicle",  # the subject, not the place
    "building along the road": "building",
    "tree near the building": "tree",
    "white car": "car",
    "light-duty vehicle": "vehicle",
    "road marking on the road": "road marking",  # the longer term at the same word
    "low vegetation": "low vegetation",
    "Impervious surfaces near the trees": "impervious surface",  # case and plural
    "buses along the road": "bus",
    "the long truck": "truck",
    "sidewalk": "sidewalk",
    "parking lot with vehicles": "parking area",
    "roadside": "other",  # whole words only
    "something else entirely": "other",
}


@pytest.mark.parametrize("phrase", sorted(CASES))
def test_phrase_category(phrase):
    assert phrase_category(phrase) == CASES[phrase]
