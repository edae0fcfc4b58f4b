"""Shared fixtures. Data tests skip with a clear reason when the shared data is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hemaedge.edge.config import DATA_ENV  # noqa: E402
from hemaedge.edge.config import data_root as _data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data directory; skips the test when it is absent."""
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set {DATA_ENV} to run data tests)")
    return root


def need(path: Path) -> Path:
    """Skip unless a data file or folder exists."""
    if not path.exists():
        pytest.skip(f"data not found: {path} (set {DATA_ENV} to run data tests)")
    return path


@pytest.fixture()
def tiny_bundle_dir(tmp_path: Path) -> Path:
    """A valid 28x28, 8-class bundle (random weights, fp32 + int8)."""
    from helpers import tiny_bundle

    return tiny_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session", autouse=True)
def _private_measurement_cache(tmp_path_factory):
    """``--backend auto`` on a CPU caches what it measured per user: the tests use a cache of their own."""
    import os

    from hemaedge.edge.classify.measure import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("measurement-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture()
def fresh_measurement_cache(tmp_path, monkeypatch):
    """An empty measurement cache for one test (tests that fake the measurement must not read a real one)."""
    from hemaedge.edge.classify.measure import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "measurement-cache"))
    return tmp_path / "measurement-cache"
