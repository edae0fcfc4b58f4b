"""``export-model --target tensorrt``: build a TensorRT engine on the workstation.

The engine-building core lives in ``hemaedge.edge.classify.trt_build`` so the station
(``hemaedge build-engine``) builds with exactly the same code; this module
only adapts it to the export pipeline. No torch import here.

An engine built on the workstation runs only on that workstation's GPU
model and TensorRT version; the station builds its own.
"""

from __future__ import annotations

import os
from typing import Any

from hemaedge.edge.classify.trt_build import BatchProfile
from hemaedge.edge.classify.trt_build import build_for_bundle as _build


def build_for_bundle(
    bundle: str | os.PathLike,
    precision: str = "int8",
    *,
    max_batch: int = 64,
    opt_batch: int = 8,
    allow_fp16_fallback: bool = False,
    log=None,
    **options: Any,
) -> dict[str, Any]:
    """Build this machine's engine into an exported bundle; a JSON-ready summary.

    Args:
        bundle: The bundle directory just written by the export.
        precision: ``int8`` (the bundle's QDQ model), ``fp16`` or ``fp32``.
        max_batch / opt_batch: The optimisation profile's batch range.
        allow_fp16_fallback: Build FP16 on a GPU without fast INT8 instead of refusing.
        log: Callable for progress lines.
        **options: Passed to ``hemaedge.edge.classify.trt_build.build_for_bundle``
            (``implicit_int8``, ``calib_dir``, ``workspace_mb``...).
    """
    profile = BatchProfile(1, min(opt_batch, max_batch), max_batch)
    result = _build(bundle, precision, profile=profile, allow_fp16_fallback=allow_fp16_fallback, log=log, **options)
    return result.to_dict()
