"""Model bundles shipped inside the package, so a fresh station works without data."""

from __future__ import annotations

from pathlib import Path

from hemaedge.edge.errors import BundleError

DEFAULT_BUNDLE = "hemanet64-sn"  # chosen by docs/models.md "Choosing the default"
DEFAULT_DETECTOR = "wbcnet"


def default_bundle_path(name: str = DEFAULT_BUNDLE) -> Path:
    """Directory of a shipped bundle (default: ``DEFAULT_BUNDLE``, the station model chosen in docs/models.md)."""
    path = Path(__file__).parent / name
    if not (path / "manifest.json").is_file():
        raise BundleError(
            f"the shipped bundle {name!r} is missing from this installation ({path}); reinstall hemaedge "
            "or pass --bundle DIR"
        )
    return path


def default_detector_path(name: str = DEFAULT_DETECTOR) -> Path:
    """Directory of the shipped white-cell detector bundle (``--segmenter learned`` without ``--detector``)."""
    path = Path(__file__).parent / name
    if not (path / "manifest.json").is_file():
        raise BundleError(
            f"no detector bundle {name!r} in this installation ({path}): pass --detector DIR, or use --segmenter stain "
            "(needs no model)"
        )
    return path
