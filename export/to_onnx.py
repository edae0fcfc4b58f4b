"""Load a source model (checkpoint, TorchScript, torch.export .pt2, foreign ONNX, or a bundle) and produce a checked
FP32 ONNX."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.errors import InputError, UsageError

OPSET = 17


@dataclass
class Source:
    """A model to export.

    Attributes:
        kind: ``checkpoint``, ``torchscript``, ``pt2``, ``onnx`` or ``bundle``.
        path: The file given by the user (for a bundle: its FP32 ONNX model).
        model: A callable torch module (None for ONNX sources).
        meta: What the file says about itself (classes, input spec, arch ...).
    """

    kind: str
    path: Path
    model: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def detect_kind(path: Path) -> str:
    """Tell the source kind from the file (extension, then contents); a folder with a manifest is a bundle."""
    if path.is_dir() and (path / "manifest.json").is_file():
        return "bundle"
    if not path.is_file():
        raise InputError(f"model {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return "checkpoint"


def load_source(path: str | Path, arch: str | None = None, classes: list[str] | None = None) -> Source:
    """Open a model file for export.

    Args:
        path: ``.pt``/``.pth`` checkpoint, TorchScript file, ``.pt2`` ExportedProgram, ``.onnx``, or a bundle
            folder (its FP32 model re-exported: re-quantized with other settings, keeping what the bundle records
            of its training).
        arch: Architecture name for bare state dicts.
        classes: Class names for bare state dicts.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind == "onnx":
        return Source(kind, path)
    if kind == "bundle":
        return bundle_source(path)
    import torch

    if kind == "torchscript":
        try:
            return Source(kind, path, torch.jit.load(str(path), map_location="cpu").eval())
        except Exception as exc:  # torch.jit raises RuntimeError and friends
            raise InputError(f"{path} is not a loadable TorchScript file ({str(exc).splitlines()[0][:120]})") from exc
    if kind == "pt2":
        try:
            return Source(kind, path, torch.export.load(str(path)))
        except Exception as exc:
            raise InputError(
                f"{path} is not a loadable torch.export program ({str(exc).splitlines()[0][:120]})"
            ) from exc
    from hemaedge.export import checkpoint

    ck = checkpoint.load(path)
    if ck["format"] == "state_dict":
        if not arch or not classes:
            raise UsageError(f"{path.name} is a bare state dict: pass --arch NAME and the data set (for class names)")
        ck.update(arch=arch, classes=list(classes), arch_kwargs={})
    model = checkpoint.build_model(ck)
    meta = {k: v for k, v in ck.items() if k != "state_dict"}
    return Source(kind, path, model, meta)


def bundle_source(path: Path) -> Source:
    """A bundle as an export source: its FP32 ONNX model, with what its manifest says of the model's training.

    What the checkpoint would have told the exporter (classes, input, output kind, architecture, training recipe and
    lineage, data digests, adaptation, terms of use, crop geometry, views) comes from the manifest, so a bundle can
    be re-exported (e.g. re-quantized with ``--quant-ops``) when its checkpoint is gone. The parent is recorded.
    """
    from hemaedge.edge.bundle import load_bundle, sha256_file

    bundle = load_bundle(path)  # verifies every artifact's sha256 first
    m = bundle.manifest
    prov = m.provenance or {}
    src, data = prov.get("source_model") or {}, prov.get("data") or {}
    meta: dict[str, Any] = {
        "classes": list(m.classes),
        "input": dict(m.to_dict()["input"]),
        "output_kind": m.output_kind,
        "arch": m.architecture,
        "epoch": src.get("epoch"),
        "recipe": prov.get("training_recipe"),
        "lineage": prov.get("training_lineage") or [],
        "data": {"train_digest": data.get("train_digest"), "sources": data.get("train_sources")},
        "adaptation": prov.get("adaptation"),
        "notice": m.notice or None,
        "crop": {
            "cell_fraction": m.crop.cell_fraction,
            "scale": m.crop.scale,
            "from": m.extra.get("crop_geometry_from"),  # how the parent got it: kept, with its measurement
            "measurement": m.extra.get("crop_measurement"),
        },
        "views": m.views,
        "critical_classes": m.extra.get("critical_classes"),
        "triage": str(bundle.file(m.artifact(None, "triage"))) if "triage" in {a.kind for a in m.artifacts} else None,
        "parent_bundle": {
            "name": m.name,
            "manifest_sha256": sha256_file(bundle.path / "manifest.json"),
            "created": prov.get("created"),
            "source_model": src,
            "export_command": prov.get("export_command"),
            "calibration": m.calibration,
        },
        "data_path": data.get("path"),
    }
    return Source("bundle", bundle.onnx_path("fp32"), None, meta)


def torch_forward(source: Source, batch: np.ndarray) -> np.ndarray:
    """Run the source model in PyTorch (eager / TorchScript / ExportedProgram) on a batch."""
    import torch

    fn = source.model.module() if source.kind == "pt2" else source.model

    def call(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = fn(torch.from_numpy(np.ascontiguousarray(x)))
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()

    try:
        return call(batch)
    except (AssertionError, RuntimeError):  # a program exported with a fixed batch: one image at a time
        return np.concatenate([call(batch[i : i + 1]) for i in range(len(batch))])


def export_torch(source: Source, height: int, width: int, out: Path) -> Path:
    """Export a torch source to ONNX with a dynamic batch dimension (input ``input``, output ``output``)."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = (torch.zeros(2, 3, height, width),)
    model = source.model
    quiet = contextlib.redirect_stdout(io.StringIO())
    try:
        if source.kind == "torchscript":
            raise RuntimeError("TorchScript goes through the TorchScript exporter")
        with quiet, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(out),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},),
                dynamo=True,
                opset_version=max(OPSET, 18),
                verbose=False,
                optimize=True,
            )
    except Exception:  # fall back to the TorchScript-based exporter (ScriptModules, older graphs)
        if source.kind == "pt2":
            model = source.model.module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(out),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                dynamo=False,
                opset_version=OPSET,
            )
    import onnx

    dim0 = onnx.load(str(out), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise UsageError(
            f"{source.path.name} was exported with a fixed batch of {dim0.dim_value}; the station batches "
            "crops, so re-export it with a dynamic batch (torch.export.export(..., dynamic_shapes="
            "({0: torch.export.Dim('batch')},)))"
        )
    return out


def adapt_foreign_onnx(src: Path, out: Path) -> dict[str, Any]:
    """Make a foreign ONNX fit the bundle contract: NCHW float input with a dynamic batch.

    Keras/TF exports usually take NHWC; a Transpose is prepended so the bundle
    input is NCHW. Returns what was found and changed (recorded in the manifest).
    """
    import onnx
    from onnx import TensorProto, helper

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf DecodeError etc.
        raise InputError(f"{src} is not a readable ONNX model ({str(exc).splitlines()[0][:120]})") from exc
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise UsageError(f"{src.name} has {len(inputs)} inputs; a classifier bundle needs exactly one image input")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UsageError(f"{src.name} input {inp.name!r} is not float32")
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UsageError(f"{src.name} input {inp.name!r} has rank {len(dims)}; expected a 4-D image batch")
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    info: dict[str, Any] = {"original_input": inp.name, "original_shape": shape, "layout": "NCHW"}
    dims[0].Clear()
    dims[0].dim_param = "N"
    for o in model.graph.output:
        od = o.type.tensor_type.shape.dim
        if len(od):
            od[0].Clear()
            od[0].dim_param = "N"
    if shape[3] == 3 and shape[1] != 3:  # NHWC
        info["layout"] = "NHWC (transposed to NCHW in the bundle)"
        h, w = shape[1], shape[2]
        old = inp.name
        internal = old + "_nhwc"
        for node in model.graph.node:
            node.input[:] = [internal if x == old else x for x in node.input]
        model.graph.node.insert(
            0, helper.make_node("Transpose", ["input"], [internal], perm=[0, 2, 3, 1], name="hemaedge_nchw_to_nhwc")
        )
        new_in = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])
        model.graph.input.remove(inp)
        model.graph.input.insert(0, new_in)
        info["height"], info["width"] = h, w
    else:
        info["height"], info["width"] = shape[2], shape[3]
    last = model.graph.node[-1].op_type if len(model.graph.node) else ""
    info["output_kind"] = "probabilities" if last == "Softmax" else "logits"
    info["input_name"] = model.graph.input[0].name
    info["output_name"] = model.graph.output[0].name
    onnx.save(model, str(out))
    return info


def check_and_simplify(path: Path) -> dict[str, Any]:
    """``onnx.checker`` (full check) then onnxslim simplification in place; returns node counts."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"ONNX checker rejects {path.name}: {str(exc).splitlines()[0]}") from exc
    before = len(model.graph.node)
    info = {"nodes_before": before, "simplifier": "onnxslim"}
    try:
        import onnxslim

        slim = onnxslim.slim(model)
        onnx.checker.check_model(slim, full_check=True)
        onnx.save(slim, str(path))
        info["nodes_after"] = len(slim.graph.node)
    except ImportError:
        info["simplifier"] = "none (onnxslim not installed)"
        info["nodes_after"] = before
    return info
