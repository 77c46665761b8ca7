"""Shared test helpers: where the reference fixtures live (``UNITOK_FIXTURES``, default ``../shared/fixtures``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    return Path(os.environ.get("UNITOK_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixture_dir(*parts: str) -> Path:
    """Return a fixture folder, or skip the test cleanly when the fixtures are not on this machine."""
    path = fixtures_root().joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path} (set UNITOK_FIXTURES)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Results must not depend on the runner's thread count beyond float noise; 2 is what the fixtures used.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process, crash-resume and demo tests (deselect with -m 'not slow' "
                                       "for a fast loop; the README's command runs everything)")
