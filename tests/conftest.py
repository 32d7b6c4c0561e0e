"""Shared fixtures: paths to the real data (tests skip cleanly where it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` or skip."""
    if not DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return DATA


def dataset(name: str) -> Path:
    """Folder of one shared dataset, or skip the test."""
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not available")
    return path

