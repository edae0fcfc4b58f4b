"""Soft-voting ensembles fused into one ONNX graph (``export-model --ensemble a.pt:0.4 b.pt:0.6``).

Design choice: a torch wrapper module exported once, not ONNX graph merging.
The members are hemaedge checkpoints, so they are torch modules already; one
``nn.Module`` that runs every member on the shared input and returns
``sum_i w_i * softmax(member_i(x))`` exports through the same exporter,
checker, simplifier, quantizer and parity check as a single model, with one
input, one output and no tensor-name collisions to rename. The station sees
one model: one engine, one pass over the crops, ``output.kind = probabilities``.
(Merging separately exported ONNX files with ``onnx.compose`` would be needed
only for members that exist only as ONNX; that is not what ``--ensemble``
takes.)

Refused before any export work (``check_members``):

* members whose class sets differ (the same classes in another order are
  mapped to the first member's order inside the graph),
* members with different colour orders,
* members with different input sizes, unless a member resizes internally (its
  architecture was built with ``internal_size``, so it accepts the ensemble's
  input size) or the caller asks the fused graph to resize (``resize=True``:
  a bilinear Resize per member in the graph),
* non-positive weights.

Members normalised with different mean/std (two training runs estimate them
from different samples) are handled exactly: the fused graph takes input
normalised with the first member's mean/std and re-normalises per member with
one per-channel multiply-add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge.errors import UsageError


@dataclass
class Member:
    """One ensemble member as read from its checkpoint (no model built yet)."""

    path: Path
    weight: float
    arch: str
    classes: list[str]
    input: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` the member was trained on."""
        return int(self.input["height"]), int(self.input["width"])

    @property
    def resizes_internally(self) -> bool:
        """True when the member's graph resizes any input to its own working size."""
        return bool((self.meta.get("arch_kwargs") or {}).get("internal_size"))


def read_members(specs: list[tuple[str, float]]) -> list[Member]:
    """Read the members' checkpoints (metadata only; cheap).

    Args:
        specs: ``[(checkpoint path, weight), ...]`` as given to ``--ensemble``.

    Raises:
        UsageError: fewer than two members, a bad weight, or a checkpoint without
            architecture, classes and input spec (bare state dicts cannot join an ensemble).
    """
    from hemaedge.export import checkpoint

    if len(specs) < 2:
        raise UsageError(f"an ensemble needs at least two members, got {len(specs)}")
    members = []
    for path, weight in specs:
        if not (weight > 0 and np.isfinite(weight)):
            raise UsageError(f"ensemble weight of {path} must be a positive number, not {weight}")
        ck = checkpoint.load(path)
        missing = [k for k in ("arch", "classes", "input") if not ck.get(k)]
        if missing:
            raise UsageError(
                f"{Path(path).name} lacks {', '.join(missing)}: ensemble members must be hemaedge "
                "checkpoints (hemaedge train writes them)"
            )
        meta = {k: v for k, v in ck.items() if k != "state_dict"}
        members.append(Member(Path(path), float(weight), str(ck["arch"]), list(ck["classes"]), dict(ck["input"]), meta))
    return members


def check_members(members: list[Member], resize: bool = False) -> dict[str, Any]:
    """Refuse members that cannot be fused; return the fused input spec and per-member plan.

    Args:
        members: From ``read_members``.
        resize: Let the fused graph resize the shared input to each member's size.

    Returns:
        ``{"classes", "input", "plan": [{"resize_to", "renormalise", "permute"}...], "weights"}``.

    Raises:
        UsageError: one line naming the first incompatibility.
    """
    first = members[0]
    classes = list(first.classes)
    colour = first.input.get("colour_order", "RGB")
    size = max((m.size for m in members), key=lambda s: s[0] * s[1])
    sizes = {m.path.name: m.size for m in members}
    plan = []
    for m in members:
        if set(m.classes) != set(classes) or len(m.classes) != len(classes):
            raise UsageError(
                f"ensemble members disagree on classes: {first.path.name} has {classes}, {m.path.name} has {m.classes}"
            )
        if m.input.get("colour_order", "RGB") != colour:
            raise UsageError(
                f"ensemble members disagree on colour order ({first.path.name} {colour}, "
                f"{m.path.name} {m.input.get('colour_order')})"
            )
        resize_to = None
        if m.size != size:
            if m.resizes_internally:
                resize_to = None  # the member's own graph resizes whatever it gets
            elif resize:
                resize_to = m.size
            else:
                raise UsageError(
                    f"ensemble members take different input sizes {sizes}; a member may differ only "
                    "if its graph resizes internally (internal_size) or the fused graph resizes "
                    "(resize=True / --ensemble-resize)"
                )
        mean_i, std_i = tuple(m.input.get("mean", (0, 0, 0))), tuple(m.input.get("std", (1, 1, 1)))
        renorm = None
        if not (
            np.allclose(mean_i, first.input.get("mean", (0, 0, 0)), atol=0, rtol=0)
            and np.allclose(std_i, first.input.get("std", (1, 1, 1)), atol=0, rtol=0)
        ):
            renorm = {"mean": list(mean_i), "std": list(std_i)}
        permute = None if m.classes == classes else [m.classes.index(c) for c in classes]
        plan.append({"resize_to": resize_to, "renormalise": renorm, "permute": permute})
    total = sum(m.weight for m in members)
    spec = dict(first.input)
    spec["height"], spec["width"] = size
    return {
        "classes": classes,
        "input": spec,
        "plan": plan,
        "weights": [m.weight / total for m in members],
        "weights_given": [m.weight for m in members],
    }


def _build_wrapper(members: list[Member], plan: dict[str, Any]):
    import torch
    import torch.nn.functional as F
    from hemaedge.export import checkpoint
    from torch import nn

    base_mean = np.asarray(plan["input"].get("mean", (0, 0, 0)), np.float64)
    base_std = np.asarray(plan["input"].get("std", (1, 1, 1)), np.float64)

    class SoftVotingEnsemble(nn.Module):
        """``sum_i w_i * softmax(member_i(prep_i(x)))``: the weighted average of the members' probabilities."""

        def __init__(self) -> None:
            super().__init__()
            self.members = nn.ModuleList(checkpoint.build_model(checkpoint.load(m.path)) for m in members)
            self.weights = [float(w) for w in plan["weights"]]
            self.resize_to = [p["resize_to"] for p in plan["plan"]]
            self.permute = [p["permute"] for p in plan["plan"]]
            for i, p in enumerate(plan["plan"]):
                scale = shift = None
                if p["renormalise"]:
                    # x_base = (v - m0)/s0  ->  x_i = (v - mi)/si = x_base * s0/si + (m0 - mi)/si
                    mi, si = np.asarray(p["renormalise"]["mean"]), np.asarray(p["renormalise"]["std"])
                    scale = torch.tensor(base_std / si, dtype=torch.float32).view(1, -1, 1, 1)
                    shift = torch.tensor((base_mean - mi) / si, dtype=torch.float32).view(1, -1, 1, 1)
                self.register_buffer(f"scale{i}", scale, persistent=False)
                self.register_buffer(f"shift{i}", shift, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = None
            for i, model in enumerate(self.members):
                xi = x
                scale = getattr(self, f"scale{i}")
                if scale is not None:
                    xi = xi * scale + getattr(self, f"shift{i}")
                if self.resize_to[i] is not None:
                    xi = F.interpolate(xi, size=tuple(self.resize_to[i]), mode="bilinear", align_corners=False)
                p = torch.softmax(model(xi), dim=1)
                if self.permute[i] is not None:
                    p = p[:, self.permute[i]]
                p = p * self.weights[i]
                out = p if out is None else out + p
            return out

    return SoftVotingEnsemble().eval()


def export_ensemble(specs: list[tuple[str, float]], out: Path, resize: bool = False):
    """Fuse checkpoints into one FP32 ONNX graph averaging their softmax outputs.

    This is the hook ``hemaedge.export.exporter.run_export`` calls for ``--ensemble``.

    Args:
        specs: ``[(checkpoint path, weight), ...]``; weights are normalised to sum to 1.
        out: Where to write the fused ONNX (input ``input``, output ``output``, dynamic batch).
        resize: Allow members with other input sizes by resizing inside the fused graph.

    Returns:
        ``(source, info)``: a ``Source`` (kind ``ensemble``, the wrapper module, meta with
        classes/input/arch) and ``info`` with ``members`` (for the manifest), ``output_kind``
        (``probabilities``), ``reference`` (torch forward of the fused module for the parity
        check) and ``arch``.

    Raises:
        UsageError: incompatible members, before any model is built or exported.
    """
    import torch
    from hemaedge.export.to_onnx import Source, export_torch

    members = read_members(specs)
    plan = check_members(members, resize=resize)  # refuse before building or exporting anything
    wrapper = _build_wrapper(members, plan)
    arch = "ensemble(" + "+".join(m.arch for m in members) + ")"
    meta = {
        "arch": arch,
        "classes": plan["classes"],
        "input": plan["input"],
        "output_kind": "probabilities",
        "crop": members[0].meta.get("crop"),
        "data": members[0].meta.get("data"),
        "recipe": [m.meta.get("recipe") for m in members],
    }
    source = Source("ensemble", Path(out), wrapper, meta)
    h, w = plan["input"]["height"], plan["input"]["width"]
    export_torch(source, h, w, Path(out))

    def reference(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    from hemaedge.edge.bundle import sha256_file

    info = {
        "members": [
            {
                "file": m.path.name,
                "sha256": sha256_file(m.path),
                "arch": m.arch,
                "arch_kwargs": m.meta.get("arch_kwargs"),
                "weight": wn,
                "weight_given": m.weight,
                "input": [*m.size],
                "epoch": m.meta.get("epoch"),
                "val_accuracy": (m.meta.get("metrics") or {}).get("val_accuracy"),
                **p,
            }
            for m, wn, p in zip(members, plan["weights"], plan["plan"])
        ],
        "output_kind": "probabilities",
        "reference": reference,
        "arch": arch,
        "height": h,
        "width": w,
    }
    return source, info


def member_probabilities(onnx_paths: list[Path], weights: list[float], x: np.ndarray) -> np.ndarray:
    """The weighted average of separately run members' softmax outputs (the reference a fused graph must equal)."""
    import onnxruntime as ort
    from hemaedge.edge.classify.base import softmax

    total = float(sum(weights))
    acc = None
    for path, w in zip(onnx_paths, weights):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        p = softmax(sess.run(None, {sess.get_inputs()[0].name: x})[0]) * (w / total)
        acc = p if acc is None else acc + p
    return acc


def time_fused_vs_members(
    fused: Path, members: list[Path], x: np.ndarray, repeats: int = 5, threads: int = 1
) -> dict[str, float]:
    """ORT CPU crops/s of the fused graph vs running each member one after the other (plus the numpy average).

    Not a unit test: a measurement for docs and reports. Median of ``repeats`` interleaved passes
    over ``x``, by wall clock and by this process's CPU time (steadier on a shared machine).
    """
    import time

    import onnxruntime as ort
    from hemaedge.edge.classify.base import softmax

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    fs = ort.InferenceSession(str(fused), so, providers=["CPUExecutionProvider"])
    ms = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in members]
    fs.run(None, {fs.get_inputs()[0].name: x})
    for s in ms:
        s.run(None, {s.get_inputs()[0].name: x})

    def fused_pass() -> None:
        fs.run(None, {fs.get_inputs()[0].name: x})

    def members_pass() -> None:
        acc = None
        for s in ms:
            p = softmax(s.run(None, {s.get_inputs()[0].name: x})[0])
            acc = p if acc is None else acc + p

    wall: dict[str, list[float]] = {"fused": [], "members_sequential": []}
    cpu: dict[str, list[float]] = {"fused": [], "members_sequential": []}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in (("fused", fused_pass), ("members_sequential", members_pass)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    out = {f"{name}_crops_per_s": round(len(x) / float(np.median(ts)), 2) for name, ts in wall.items()}
    out.update({f"{name}_crops_per_cpu_s": round(len(x) / float(np.median(ts)), 2) for name, ts in cpu.items()})
    out["speedup"] = round(out["fused_crops_per_s"] / out["members_sequential_crops_per_s"], 3)
    out["speedup_cpu"] = round(out["fused_crops_per_cpu_s"] / out["members_sequential_crops_per_cpu_s"], 3)
    return out
