"""Shared pytest configuration for tunnelgraph's test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Make ``from zoo import ...`` work from every test module.
_TESTS_DIR = Path(__file__).parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

from zoo import TRACEABLE, ZooEntry  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Reseed torch's global RNG before every test."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(params=TRACEABLE, ids=[e.name for e in TRACEABLE])
def zoo_entry(request: pytest.FixtureRequest) -> ZooEntry:
    """Each traceable zoo architecture in turn."""
    return request.param
