"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "HEMAEDGE_DATA"


def data_root() -> Path:
    """Where the shared data sets live (``$HEMAEDGE_DATA``, default ``../shared/data``)."""
    return Path(os.environ.get(DATA_ENV, "../shared/data")).expanduser()
