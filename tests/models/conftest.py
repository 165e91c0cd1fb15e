"""Fixtures of the model tests (helpers live in tests/models/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import make_batch


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch(2)
