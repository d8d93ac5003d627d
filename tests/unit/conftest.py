"""Fixtures of the unit tests (the tiny models are in tests/conftest.py; shared builders in common.py)."""

from __future__ import annotations

import pytest

from trl_guided.models import resolve_model_path

from .common import EMBEDDED


@pytest.fixture(scope="module")
def embedded():
    """The embedded SmolLM2-135M's local folder (converted from its GGUF once)."""
    return resolve_model_path(EMBEDDED)
