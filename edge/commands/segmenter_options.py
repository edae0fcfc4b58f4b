"""The white-cell segmenter options shared by ``count``, ``collect`` and ``bench``, and the scale they record."""

from __future__ import annotations

import argparse
from typing import Any


def add_segmenter_options(parser: argparse.ArgumentParser) -> None:
    """``--segmenter`` and ``--px-per-um``."""
    from hemaedge.edge.segment import SEGMENTERS

    parser.add_argument(
        "--segmenter",
        default=None,
        choices=sorted(SEGMENTERS),
        help="white-cell segmenter: checked (the detector bundle, checked against the stain segmenter on the "
        "session's first white cells; the default when it is installed), learned (the detector alone) or stain "
        "(classical stain thresholding, needs no model: the fallback)",
    )
    parser.add_argument(
        "--detector",
        default=None,
        metavar="BUNDLE",
        help="detector bundle for --segmenter checked or learned (default: the shipped one)",
    )
    parser.add_argument(
        "--px-per-um",
        type=_positive,
        default=None,
        metavar="PX",
        help="this microscope's pixels per micron, if known (default: measured on the red cells of the first "
        "frames; a phone at the eyepiece of a 40x objective is about 1-2, a 100x camera 5-20)",
    )


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels per micron, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"pixels per micron must be positive, got {text}")
    return v


def scale_info(segmenter: Any) -> dict[str, Any]:
    """For a session's summary: ``{"scale": {...}}``, the segmenter's scale (measured or stated), and for the
    checked detector ``{"detector_check": {...}}``, what its check against the stain segmenter saw and decided."""
    out: dict[str, Any] = {}
    scale = getattr(segmenter, "scale", None)
    if scale is not None:
        out["scale"] = {**scale.as_dict(), "describe": scale.describe()}
    check = getattr(segmenter, "check", None)  # the checked detector's (edge/segment/checked.py)
    if check is not None:
        out["detector_check"] = check
    return out
