"""The object category a referring phrase is about, for datasets that do not store one.

RRSIS-D annotates a category per object (`categories_id`); RefSegRS does not, but its phrases
are built from the 14 categories of its source imagery (SkyScapes): road, vehicle, car, van,
truck, trailer, bus, road marking, bikeway, sidewalk, building, tree, low vegetation, impervious
surface. The rule, one for every phrase:

    the category is that of the category term that starts earliest in the phrase; when two
    terms start at the same word, the longer one ("road marking" before "road"). A phrase with
    no known term is "other".

So the subject of a relational phrase wins: "vehicle in the parking area" is a vehicle, "building
along the road" a building, "white car" a car, "light-duty vehicle" a vehicle. Terms match whole
words, singular or plural ("vehicles", "buses").
"""

from __future__ import annotations

import re

OTHER = "other"

# term -> category. Synonyms seen in RefSegRS-style phrases map onto the 14 categories (plus
# "parking area", which RefSegRS phrases use as a referent of their own).
TERMS: dict[str, str] = {
    "road marking": "road marking",
    "lane marking": "road marking",
    "road": "road",
    "street": "road",
    "vehicle": "vehicle",
    "car": "car",
    "van": "van",
    "truck": "truck",
    "trailer": "trailer",
    "bus": "bus",
    "bikeway": "bikeway",
    "bike lane": "bikeway",
    "sidewalk": "sidewalk",
    "building": "building",
    "house": "building",
    "tree": "tree",
    "low vegetation": "low vegetation",
    "vegetation": "low vegetation",
    "grass": "low vegetation",
    "impervious surface": "impervious surface",
    "parking area": "parking area",
    "parking lot": "parking area",
    "parking place": "parking area",
}

# One alternation, longest terms first so that at one position the longer term matches; whole
# words only, with an optional plural ending.
_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(t) for t in sorted(TERMS, key=len, reverse=True)) + r")(?:e?s)?\b",
    re.IGNORECASE,
)


def phrase_category(phrase: str) -> str:
    """The category of the earliest category term in `phrase` (see the module doc), or "other"."""
    match = _PATTERN.search(phrase)
    return TERMS[match.group(1).lower()] if match else OTHER


# RISBench (CroBIM) stores no category either: its 26 categories, and the words its phrases use
# for them, by the same rule (the earliest term; the longer one at the same word).
RISBENCH_TERMS: dict[str, str] = {
    **{c: c for c in (
        "expressway service area", "expressway toll station", "ground track field", "basketball court",
        "container crane", "roundabout", "windmill", "overpass", "stadium", "bridge", "soccer ball field",
        "baseball diamond", "train station", "golf field", "airport", "harbor", "dam", "ship", "helipad",
        "vehicle", "chimney", "airplane", "helicopter", "tennis court", "storage tank", "swimming pool",
    )},
    "service area": "expressway service area",
    "toll station": "expressway toll station",
    "track field": "ground track field",
    "soccer field": "soccer ball field",
    "football field": "soccer ball field",
    "baseball field": "baseball diamond",
    "golf course": "golf field",
    "harbour": "harbor",
    "wind turbine": "windmill",
    "car": "vehicle",
    "plane": "airplane",
    "crane": "container crane",
    "tank": "storage tank",
}


def term_categorizer(terms: dict[str, str]):
    """phrase -> category by the rule of this module over `terms` (term -> category)."""
    pattern = re.compile(
        r"\b(" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")(?:e?s)?\b", re.IGNORECASE
    )
    lowered = {t.lower(): c for t, c in terms.items()}

    def categorize(phrase: str) -> str:
        match = pattern.search(phrase)
        return lowered[match.group(1).lower()] if match else OTHER

    return categorize


risbench_category = term_categorizer(RISBENCH_TERMS)
