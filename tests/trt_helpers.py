"""Bundles and calibration images for the TensorRT contract tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import BLOODMNIST_CLASSES, tiny_onnx
from hemaedge.edge.bundle import BundleWriter, CropGeometry, InputSpec, Manifest


def symmetric_int8(fp32: Path, out: Path, size: int) -> Path:
    """QDQ INT8 with int8 symmetric activations and weights (what TensorRT accepts)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.it = iter([{"input": rng.normal(0, 1, (4, 3, size, size)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


def trt_bundle(out: Path, size: int = 28, int8: bool = True) -> Path:
    """A tiny valid bundle whose int8 ONNX is TensorRT-compatible (symmetric)."""
    work = out.parent / (out.name + ".src")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = tiny_onnx(work / "model.onnx", size, len(BLOODMNIST_CLASSES))
    manifest = Manifest(
        name="tiny-trt",
        architecture="tiny",
        classes=BLOODMNIST_CLASSES,
        input=InputSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        crop=CropGeometry(),
        artifacts=(),
        provenance={"note": "random weights, tests/trt_helpers.py"},
    )
    with BundleWriter(out, overwrite=True) as w:
        w.add(fp32, "onnx", "fp32")
        if int8:
            w.add(symmetric_int8(fp32, work / "model.int8.onnx", size), "onnx", "int8")
        return w.finish(manifest).path


def calibration_folder(folder: Path, n: int = 20, seed: int = 3) -> tuple[Path, list[np.ndarray]]:
    """``n`` random RGB crops written as PNG (OpenCV writes BGR); returns the folder and the RGB images."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        img = rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"crop_{i:03d}.png"), img[..., ::-1])
        images.append(img)
    return folder, images
