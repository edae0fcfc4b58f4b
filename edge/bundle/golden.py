"""Golden outputs: does the station compute what the workstation computed?

At export, a small set of preprocessed inputs and the workstation's raw model
outputs (FP32, and INT8 when built) are stored in the bundle as
``golden.npz`` (artifact kind ``golden``). On the station ``hemaedge verify``
runs the same inputs through whatever backend it selected and compares
class probabilities: top-1 agreement and the largest absolute difference.

The reference is the workstation output at the precision the station runs
(INT8 for an INT8 engine or model built from the bundle's QDQ INT8, FP32
otherwise; an implicit-INT8 engine is calibrated on the station and is
compared with FP32). numpy only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.bundle.io import Bundle, BundleWriter, add_artifact, load_bundle
from hemaedge.edge.errors import BundleError, UsageError

GOLDEN_FILE = "golden.npz"
GOLDEN_KIND = "golden"

# Per precision the station runs: (min top-1 agreement, max |probability difference|).
# FP32 allows TF32 (TensorRT's default on Ampere and later, Jetson Orin included).
THRESHOLDS = {"fp32": (0.99, 0.01), "fp16": (0.98, 0.05), "int8": (0.95, 0.15), "int8_cpu": (0.95, 0.15)}


def _probabilities(raw: np.ndarray, output_kind: str) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)
    if output_kind == "probabilities":
        return raw
    z = np.exp(raw - raw.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) if len(a) else 1.0


def write_golden(
    target: BundleWriter | Bundle | str | os.PathLike,
    inputs: np.ndarray,
    outputs_by_precision: dict[str, np.ndarray],
    output_kind: str = "logits",
) -> dict[str, Any]:
    """Store golden inputs and outputs in a bundle and list them in its manifest.

    Args:
        target: A ``BundleWriter`` being filled (during export), or an existing
            bundle (``Bundle`` or directory; its manifest is rewritten).
        inputs: Preprocessed ``N x C x H x W`` float32 inputs (a few dozen:
            the file holds ``N*C*H*W*4`` bytes).
        outputs_by_precision: Raw model outputs ``N x K`` per precision run
            on the workstation, e.g. ``{"fp32": ..., "int8": ...}``.
        output_kind: ``logits`` or ``probabilities`` (the manifest's
            ``output.kind``); only used for the summary's agreement figure.

    Returns:
        A JSON-ready summary (file, samples, precisions, FP32/INT8 top-1 agreement).
    """
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise UsageError(f"golden inputs must be a non-empty N x C x H x W array, got shape {x.shape}")
    if "fp32" not in outputs_by_precision:
        raise UsageError("golden outputs need at least the fp32 run")
    arrays = {"inputs": x}
    for precision, out in outputs_by_precision.items():
        if precision not in THRESHOLDS:
            raise UsageError(f"golden precision {precision!r} is not one of {tuple(THRESHOLDS)}")
        out = np.asarray(out, dtype=np.float32)
        if len(out) != len(x):
            raise UsageError(f"golden {precision} outputs have {len(out)} rows for {len(x)} inputs")
        arrays[f"outputs_{precision}"] = out.reshape(len(out), -1)
    summary: dict[str, Any] = {"file": GOLDEN_FILE, "samples": len(x), "precisions": sorted(outputs_by_precision)}
    if "int8" in outputs_by_precision:
        summary["fp32_int8_top1_agreement"] = round(
            _agreement(
                _probabilities(arrays["outputs_fp32"], output_kind), _probabilities(arrays["outputs_int8"], output_kind)
            ),
            4,
        )
    details = {k: v for k, v in summary.items() if k != "file"}

    if isinstance(target, BundleWriter):
        path = target.dir / GOLDEN_FILE
        np.savez_compressed(path, **arrays)
        target.add(path, GOLDEN_KIND, None, **details)
        return summary
    bundle = target if isinstance(target, Bundle) else load_bundle(target)
    with tempfile.TemporaryDirectory(dir=bundle.path) as tmp:
        path = Path(tmp) / GOLDEN_FILE
        np.savez_compressed(path, **arrays)
        add_artifact(bundle, path, GOLDEN_KIND, None, **details)
    return summary


@dataclass(frozen=True)
class Golden:
    """Golden inputs and the workstation's raw outputs per precision."""

    inputs: np.ndarray
    outputs: dict[str, np.ndarray]


def load_golden(bundle: Bundle) -> Golden:
    """Read a bundle's ``golden.npz`` (already sha256-checked by ``load_bundle``).

    Raises:
        BundleError: the bundle has no golden outputs (exported before they existed).
    """
    try:
        art = bundle.manifest.artifact(None, GOLDEN_KIND)
    except BundleError as exc:
        raise BundleError(
            f"bundle '{bundle.manifest.name}' has no golden outputs to verify against: "
            "re-export it with a current export-model"
        ) from exc
    with np.load(bundle.file(art), allow_pickle=False) as z:
        outputs = {k[len("outputs_") :]: z[k] for k in z.files if k.startswith("outputs_")}
        inputs = z["inputs"]
    if "fp32" not in outputs:
        raise BundleError(f"{art.file} has no fp32 outputs")
    return Golden(inputs, outputs)


@dataclass
class GoldenReport:
    """How the station's outputs compare with the workstation's."""

    reference: str
    samples: int
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    min_agreement: float
    max_diff: float
    passed: bool
    others: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def reference_precision(golden: Golden, backend_precision: str, station_calibrated: bool = False) -> str:
    """Which workstation output to compare with (see module docstring)."""
    for key in dict.fromkeys((backend_precision, backend_precision.split("_")[0])):  # int8_cpu, then int8
        if key in golden.outputs and not (key.startswith("int8") and station_calibrated):
            return key
    return "fp32"


def compare_golden(
    golden: Golden,
    probabilities: np.ndarray,
    backend_precision: str,
    output_kind: str = "logits",
    station_calibrated: bool = False,
    min_agreement: float | None = None,
    max_diff: float | None = None,
) -> GoldenReport:
    """Compare the station's class probabilities with the golden outputs.

    Args:
        golden: From ``load_golden``.
        probabilities: The station backend's ``classify`` output for ``golden.inputs``.
        backend_precision: The precision the station ran (``int8``/``fp16``/``fp32``), or the model
            variant (``int8_cpu``: the bundle's CPU INT8 model) when the backend says so (``golden_key``).
        output_kind: The manifest's ``output.kind``.
        station_calibrated: The station's INT8 was calibrated there (implicit INT8),
            so the workstation's INT8 outputs are not its reference.
        min_agreement / max_diff: Override the thresholds for ``backend_precision``.
    """
    got = np.asarray(probabilities, dtype=np.float64)
    if got.shape[0] != len(golden.inputs):
        raise UsageError(f"{got.shape[0]} station outputs for {len(golden.inputs)} golden inputs")
    ref_name = reference_precision(golden, backend_precision, station_calibrated)
    default_agree, default_diff = THRESHOLDS.get(backend_precision, THRESHOLDS["fp32"])
    agree_min = default_agree if min_agreement is None else min_agreement
    diff_max = default_diff if max_diff is None else max_diff
    stats = {}
    for name, raw in golden.outputs.items():
        ref = _probabilities(raw, output_kind)
        if ref.shape != got.shape:
            raise UsageError(f"station outputs {got.shape} do not match golden {name} outputs {ref.shape}")
        diff = np.abs(ref - got)
        stats[name] = {
            "top1_agreement": round(_agreement(ref, got), 4),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
        }
    s = stats[ref_name]
    return GoldenReport(
        reference=ref_name,
        samples=int(got.shape[0]),
        top1_agreement=s["top1_agreement"],
        max_abs_diff=s["max_abs_diff"],
        mean_abs_diff=s["mean_abs_diff"],
        min_agreement=agree_min,
        max_diff=diff_max,
        passed=s["top1_agreement"] >= agree_min and s["max_abs_diff"] <= diff_max,
        others={k: v for k, v in stats.items() if k != ref_name},
    )
