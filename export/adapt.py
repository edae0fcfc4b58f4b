"""``hemaedge adapt``: fit a bundle to a new microscope from a few verified cells of that microscope.

The station counts with a bundle trained elsewhere; a technician verifies cells in the review page and exports
them (``hemaedge export-cells``), or sorts ``hemaedge collect --by-class`` crops. ``adapt`` fine-tunes the
bundle's own checkpoint on those cells, mixed with a replay of the parent's training data so it keeps what it
knew, then re-exports through the same ``export-model`` path (ONNX, INT8 and its accuracy gate) and records the
adaptation in the manifest: the parent bundle, the cells per class, their digest and the sessions they came from.

Two guards: too few verified cells of a class are refused before any work (``--min-per-class``), and the adapted
model may not lose more than ``--max-parent-drop`` points on the parent's own validation split. A model that loses
more is moved back toward the parent's weights, step by step, until it keeps the limit (``interpolate_back``; off
with ``--no-interpolate``), and refused only if even a tenth of the adaptation loses too much.

What is adapted, and how much, is a measured choice (``docs/models.md``, "Adapting a bundle"): ``--strategy all``
fine-tunes every layer at a low learning rate with the new cells up-weighted; ``head`` only the classifier; ``norm`` the batch-norm
statistics and affine parameters plus the classifier. The exported weights are the moving average of the steps'
(``--ema``), which made the result depend far less on the seed.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.calibration.datasets import ImageSet, load_folder, open_dataset, stratified_sample
from hemaedge.edge.bundle import InputSpec, preprocess, sha256_file
from hemaedge.edge.bundle.manifest import stain_fields
from hemaedge.edge.errors import AccuracyGateError, InputError, UsageError

STRATEGIES = ("all", "head", "norm")


@dataclass
class AdaptOptions:
    """What ``hemaedge adapt`` was asked for (recorded in the adapted bundle's manifest)."""

    bundle: str
    cells: str
    out: str
    checkpoint: str | None = None
    data: str | None = None
    strategy: str = "all"
    epochs: int = 12
    lr: float = 0.0005
    new_share: float = 0.5
    replay: int = 4000
    min_per_class: int = 5
    max_parent_drop: float = 1.0
    max_drop: float = 1.0
    batch: int = 64
    ema: float = 0.99
    interpolate: bool = True
    holdout: float = 0.0
    seed: int = 0
    threads: int = 0
    overwrite: bool = False
    name: str | None = None

    def validate(self) -> None:
        """Refuse contradictory options before any work."""
        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if not 0.0 < self.new_share < 1.0:
            raise UsageError("--new-share must lie strictly between 0 and 1")
        if self.epochs < 1 or self.min_per_class < 1:
            raise UsageError("--epochs and --min-per-class must be at least 1")
        if not 0.0 <= self.holdout < 1.0:
            raise UsageError(
                f"--holdout must be in [0, 1) (the share of each class's cells kept out), not {self.holdout}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"--ema must be in [0, 1) (0: off), not {self.ema}")
        if Path(self.out).exists() and any(Path(self.out).iterdir()) and not self.overwrite:
            raise UsageError(f"{self.out} exists and is not empty: pass --overwrite or choose another --out")


@dataclass(frozen=True)
class Parent:
    """The bundle being adapted, its checkpoint and its training data."""

    bundle: Any
    checkpoint: Path
    ck: dict[str, Any]
    data: str
    spec: InputSpec
    classes: tuple[str, ...]


def find_parent(opts: AdaptOptions) -> Parent:
    """The parent bundle and the checkpoint it was exported from (checked by sha256), and its data set."""
    from hemaedge.edge.station import resolve_bundle
    from hemaedge.export import checkpoint as ckpt_mod

    bundle = resolve_bundle(opts.bundle)
    m = bundle.manifest
    source = m.provenance.get("source_model") or {}
    path = Path(opts.checkpoint) if opts.checkpoint else Path(ckpt_mod.__file__).parent / "checkpoints" / f"{m.name}.pt"
    if not path.is_file():
        raise UsageError(
            f"adapt needs the checkpoint bundle '{m.name}' was exported from: {path} does not exist (pass --checkpoint)"
        )
    if source.get("sha256") and sha256_file(path) != source["sha256"]:
        raise UsageError(f"{path} is not the checkpoint bundle '{m.name}' was exported from (sha256 differs)")
    ck = ckpt_mod.load(path)
    data = opts.data or (m.metrics or {}).get("data") or ((m.provenance.get("data") or {}).get("path"))
    if not data or not Path(data).exists():
        raise UsageError(
            f"adapt replays the parent's training data and checks its validation split: pass --data "
            f"(the manifest names {data!r}, which is not here)"
        )
    inp = ck.get("input") or {}
    spec = InputSpec(
        height=int(inp.get("height", m.input.height)),
        width=int(inp.get("width", m.input.width)),
        mean=tuple(inp.get("mean", m.input.mean)),
        std=tuple(inp.get("std", m.input.std)),
        white_balance=bool(inp.get("white_balance", m.input.white_balance)),
        **stain_fields(inp, m.input),
    )
    return Parent(bundle, path, ck, str(data), spec, tuple(ck.get("classes") or m.classes))


def read_cells(opts: AdaptOptions, classes: tuple[str, ...]) -> tuple[ImageSet, dict[str, int]]:
    """The verified cells of the new microscope; refuses too few per class, naming the class and the count."""
    try:
        cells = load_folder(opts.cells, None, classes=classes)
    except InputError as exc:
        raise UsageError(f"--cells {opts.cells}: {exc}") from exc
    if (cells.labels < 0).any():
        raise UsageError(
            f"--cells {opts.cells}: cells must be sorted into class folders named like the bundle's classes"
        )
    per = per_class(cells)
    few = {c: n for c, n in per.items() if n < opts.min_per_class}
    if few:
        listed = ", ".join(f"{c} {n}" for c, n in few.items())
        raise UsageError(
            f"too few verified cells to adapt: {listed} (at least {opts.min_per_class} per class; verify more cells "
            "of those classes, or leave their folders out: classes without new cells keep what the bundle knew)"
        )
    if len(per) < 2:
        raise UsageError(f"--cells {opts.cells} holds one class only ({', '.join(per)}): adapt needs at least two")
    return cells, per


def per_class(images: ImageSet) -> dict[str, int]:
    """How many images of each class a set holds (classes it lacks left out)."""
    return {images.classes[k]: int(n) for k, n in zip(*np.unique(images.labels, return_counts=True))}


def split_holdout(cells: ImageSet, opts: AdaptOptions) -> tuple[ImageSet, ImageSet | None]:
    """``--holdout``: keep that share of each class's verified cells out of adapting, to score the parent and the
    adapted model on cells of this microscope neither was fitted to. Refuses a split that leaves a class fewer than
    ``--min-per-class`` cells to adapt on."""
    if not opts.holdout:
        return cells, None
    rng = np.random.default_rng(opts.seed)
    keep, held = [], []
    for k in np.unique(cells.labels):
        idx = rng.permutation(np.flatnonzero(cells.labels == k))
        n = int(np.floor(len(idx) * opts.holdout))
        if len(idx) - n < opts.min_per_class:
            raise UsageError(
                f"--holdout {opts.holdout} leaves {len(idx) - n} {cells.classes[k]} cells to adapt on (at least "
                f"{opts.min_per_class}): verify more cells or keep out a smaller share"
            )
        held += idx[:n].tolist()
        keep += idx[n:].tolist()
    return cells.subset(np.sort(keep)), cells.subset(np.sort(held)) if held else None


def _trainable(model: Any, strategy: str) -> list:
    """The parameters ``strategy`` adapts (the rest are frozen)."""
    from torch import nn

    for p in model.parameters():
        p.requires_grad = strategy == "all"
    head = list(model.modules())
    last = [m for m in head if isinstance(m, nn.Linear)][-1:]
    keep = list(last)
    if strategy == "norm":
        keep += [m for m in head if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]
    for m in keep:
        for p in m.parameters():
            p.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def fine_tune(parent: Parent, cells: ImageSet, opts: AdaptOptions, log=print) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the parent's model on the new cells with a replay of its training data; returns the model and
    the parent-validation numbers before and after."""
    import torch
    from hemaedge.export.checkpoint import build_model
    from hemaedge.export.train import Ema, augment, set_stains, to_model_input

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    model = build_model(parent.ck)
    train = open_dataset(parent.data, "train", classes=parent.classes)
    val = open_dataset(parent.data, "val", classes=parent.classes)
    replay = train.subset(stratified_sample(train.labels, opts.replay, opts.seed))
    # raw pixels at model size: augmented first, then the station's preprocessing, as in training
    xr = torch.from_numpy(_raw(replay, parent.spec)).permute(0, 3, 1, 2).float() / 255
    yr = torch.from_numpy(replay.labels)
    xn = torch.from_numpy(_raw(cells, parent.spec)).permute(0, 3, 1, 2).float() / 255
    yn = torch.from_numpy(cells.labels)
    before = _accuracy(model, val, parent.spec)
    log(f"parent on its own val ({parent.data}): {before:.4f}; {len(cells)} new cells, {len(replay)} replayed")
    params = _trainable(model, opts.strategy)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-4)
    own = parent_augmentation(parent.ck.get("recipe") or {}, parent.spec)
    # the few new cells get the parent's augmentation plus stain and zoom jitter (so ten cells teach a colour
    # range, not ten pictures); the replayed images get exactly what the parent was trained with
    new_aug = tuple(dict.fromkeys(own + ("stain", "zoom")))
    sn = sr = None
    if "stainrot" in own:  # each set one session: the lab's cells, the parent's training data
        sn, sr = set_stains(cells, parent.spec.height)[None], set_stains(train, parent.spec.height)[None]
    gen = torch.Generator().manual_seed(opts.seed)
    # ten cells a class make each step's weights a noisy draw: the average of the last ~100 steps' weights is what
    # is exported (measured: docs/models.md, "Adapting a bundle")
    ema = Ema(model, opts.ema) if opts.ema else None
    steps = max(20, int(np.ceil(len(replay) / opts.batch)))
    n_new = max(1, int(round(opts.batch * opts.new_share)))
    t0 = time.time()
    for epoch in range(opts.epochs):
        # batch-norm statistics stay the parent's (a few cells would drag them) unless the strategy adapts them
        model.train(opts.strategy == "norm")
        tot = 0.0
        for _ in range(steps):
            i = torch.from_numpy(rng.integers(0, len(xn), n_new))
            j = torch.from_numpy(rng.integers(0, len(xr), opts.batch - n_new))
            x = torch.cat(
                [
                    augment(xn[i], new_aug, gen, stains=None if sn is None else sn.expand(len(i), 2, 3)),
                    augment(xr[j], own, gen, stains=None if sr is None else sr.expand(len(j), 2, 3)),
                ]
            )
            x = to_model_input(x, replace(parent.spec, stain_ref=0.0))  # sets were stain-normalised whole (``_raw``)
            y = torch.cat([yn[i], yr[j]])
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model)
            tot += float(loss.detach())
        log(f"  adapt epoch {epoch + 1}/{opts.epochs}: loss {tot / steps:.3f} ({time.time() - t0:.0f} s)")
    model = ema.module if ema is not None else model
    model.eval()
    after = _accuracy(model, val, parent.spec)
    drop = (before - after) * 100
    log(f"adapted model on the parent's val: {after:.4f} (change {-drop:+.2f} points, limit -{opts.max_parent_drop})")
    numbers = {"parent_val_accuracy": before, "fine_tuned_val_accuracy": after, "interpolation": 1.0}
    if drop > opts.max_parent_drop and opts.interpolate:
        model, alpha, after = interpolate_back(parent, model, val, before, opts.max_parent_drop, log)
        numbers["interpolation"] = alpha
        drop = (before - after) * 100
    if drop > opts.max_parent_drop:
        raise AccuracyGateError(
            f"adapting lost {drop:.2f} points on the parent's own validation data ({before:.4f} -> {after:.4f}), more "
            f"than --max-parent-drop {opts.max_parent_drop}"
            + (", even moved 0.9 of the way back to the parent's weights" if opts.interpolate else "")
            + ": try "
            + ("--strategy head, " if opts.strategy == "all" else "")
            + "a smaller --new-share (0.35 kept within 1 point in docs/models.md), fewer --epochs or a lower --lr"
        )
    return model, {**numbers, "adapted_val_accuracy": after, "seconds": round(time.time() - t0, 1)}


INTERPOLATION_STEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def interpolate_back(parent: Parent, model: Any, val: ImageSet, before: float, limit: float, log=print):
    """The adapted weights moved back toward the parent's, ``(1 - a) * parent + a * adapted`` for a = 0.9, 0.8, ...
    0.1, stopping at the first (largest) ``a`` that keeps the parent's val within ``limit`` points. Chosen on the
    parent's val only, never on the lab's cells. Fine-tuning from the parent keeps both weight sets in one basin, so
    the models between them are models too (Wortsman et al. 2022, "WiSE-FT"). Returns the model, ``a`` and its
    val accuracy; when no ``a`` keeps the limit, the last one tried (the caller refuses it)."""
    import copy

    import torch
    from hemaedge.export.checkpoint import build_model

    start = build_model(parent.ck).state_dict()
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mixed = copy.deepcopy(model)
    after = 0.0
    for a in INTERPOLATION_STEPS:
        mixed.load_state_dict(
            {k: torch.lerp(start[k].to(v.dtype), v, a) if v.is_floating_point() else v for k, v in end.items()}
        )
        mixed.eval()
        after = _accuracy(mixed, val, parent.spec)
        drop = (before - after) * 100
        log(
            f"  {a:.1f} of the way from the parent's weights to the adapted ones: parent's val {after:.4f} ({-drop:+.2f})"
        )
        if drop <= limit:
            break
    return mixed, a, after


def score_holdout(parent: Parent, model: Any, held: ImageSet, log=print) -> dict[str, Any]:
    """The parent's and the adapted model's accuracy on the verified cells kept out of adapting (FP32, one session,
    the parent bundle's test-time views), with the adapted one's 95 % Wilson interval."""
    from hemaedge.edge.count.stats import wilson_interval
    from hemaedge.export.checkpoint import build_model

    views = parent.bundle.manifest.views
    before = _accuracy(build_model(parent.ck), held, parent.spec, views)
    after = _accuracy(model, held, parent.spec, views)
    lo, hi = wilson_interval(round(after * len(held)), len(held))
    log(
        f"on {len(held)} verified cells kept out of adapting: parent {before:.3f} -> adapted {after:.3f} "
        f"(95 % interval {lo / 100:.3f}-{hi / 100:.3f})"
    )
    return {
        "cells_per_class": per_class(held),
        "cells_digest": held.digest,
        "parent_accuracy": round(before, 5),
        "adapted_accuracy": round(after, 5),
        "adapted_interval95": [round(lo / 100, 4), round(hi / 100, 4)],
    }


def parent_augmentation(recipe: dict[str, Any], spec: InputSpec) -> tuple[str, ...]:
    """The augmentation the parent was trained with, as ``augment`` names.

    ``hemaedge train`` records a tuple; the research trainer that made the multi-source models recorded a comma
    string of photometric ops and always applied flips, any-angle rotation and zoom. With session stain
    normalisation the strength jitter is the residual one (``odres``), as in its training.
    """
    aug = recipe.get("aug") or ("flip", "rot90")
    names = tuple(a for a in (aug.split(",") if isinstance(aug, str) else aug) if a)
    if isinstance(aug, str) and "framing" in recipe:  # the research trainer: geometry always on
        names = ("flip", "rotate", "zoom", *names)
    if isinstance(aug, str) and recipe.get("stainrot"):  # the research trainer's stain turning, a separate option
        names = ("stainrot", *names)
    if spec.stain_ref:
        names = tuple("odres" if a == "od" else a for a in names)
    return tuple(dict.fromkeys(names))


def _raw(images: ImageSet, spec: InputSpec) -> np.ndarray:
    """Raw pixels at model size; with session stain normalisation the set is one session (the lab's cells are one
    microscope's; the parent's replayed data one source), normalised before augmentation as in training."""
    from hemaedge.calibration.datasets import session_stain
    from hemaedge.edge.bundle.preprocess import normalise_stain_u8
    from hemaedge.export.train import raw_pixels

    idx = np.arange(len(images))
    x = np.concatenate([raw_pixels(images.images(idx[s : s + 256]), spec.height) for s in range(0, len(idx), 256)])
    return normalise_stain_u8(x, session_stain(images, spec), spec) if spec.stain_ref else x


def _accuracy(model: Any, images: ImageSet, spec: InputSpec, views: int = 1) -> float:
    """Top-1 accuracy of a torch model on a set taken as one session, each crop classified in ``views`` views as
    the station does."""
    import torch
    from hemaedge.calibration.datasets import session_stain
    from hemaedge.edge.classify.views import expand, merge

    model.eval()
    right = 0
    stain = session_stain(images, spec) if spec.stain_ref else None
    with torch.no_grad():
        for s in range(0, len(images), 256):
            idx = np.arange(s, min(s + 256, len(images)))
            x = expand(preprocess(images.images(idx), spec, session=stain), views)
            p = merge(torch.softmax(model(torch.from_numpy(x)), 1).numpy(), views)
            right += int((p.argmax(1) == images.labels[idx]).sum())
    return right / max(1, len(images))


def sessions_of(cells_dir: str | Path) -> list[dict[str, Any]]:
    """The sessions the cells came from, when ``hemaedge export-cells`` wrote them (its ``export-cells.json``)."""
    try:
        from hemaedge.edge.review.export_cells import sessions_of as from_export
    except ImportError:  # pragma: no cover - the review ships with the package
        return []
    if not (Path(cells_dir) / "export-cells.json").is_file():
        return []  # sorted by hand (hemaedge collect --by-class): no session record
    return list(from_export(cells_dir))


def adapt(opts: AdaptOptions, log=print) -> dict[str, Any]:
    """Adapt, re-export through the gate, and return the export summary plus the adaptation record."""
    from hemaedge.export import checkpoint as ckpt_mod
    from hemaedge.export.exporter import ExportOptions, run_export
    from hemaedge.export.train import stage_lineage

    opts.validate()
    parent = find_parent(opts)
    cells, _ = read_cells(opts, parent.classes)
    cells, held = split_holdout(cells, opts)
    if opts.holdout and held is None:
        log(f"--holdout {opts.holdout} keeps no cell out: no class has {int(np.ceil(1 / opts.holdout))} cells")
    counts = per_class(cells)
    model, numbers = fine_tune(parent, cells, opts, log)
    if held is not None:
        numbers["holdout"] = score_holdout(parent, model, held, log)
    out = Path(opts.out)
    work = out.parent / f".{out.name}.adapt"
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "parent_bundle": parent.bundle.manifest.name,
        "parent_manifest_sha256": sha256_file(Path(parent.bundle.path) / "manifest.json"),
        "parent_checkpoint_sha256": sha256_file(parent.checkpoint),
        "cells": str(opts.cells),
        "cells_per_class": counts,
        "cells_digest": cells.digest,
        "sessions": sessions_of(opts.cells),
        "recipe": {k: v for k, v in asdict(opts).items() if k not in ("out", "overwrite")},
        **{k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()},
    }
    ck_path = work / "adapted.pt"
    meta = {k: v for k, v in parent.ck.items() if k not in ("state_dict", "format", "lineage", "adaptation")}
    ckpt_mod.save(
        ck_path,
        **meta,
        state_dict=model.state_dict(),
        lineage=stage_lineage(parent.checkpoint, parent.ck),
        adaptation=record,
    )
    m = parent.bundle.manifest
    summary = run_export(
        ExportOptions(
            source=str(ck_path),
            out=str(out),
            data=parent.data,
            int8=any(a.precision == "int8" for a in m.artifacts),
            max_drop=opts.max_drop,
            cell_fraction=m.crop.cell_fraction,
            crop_scale=m.crop.scale,
            views=m.views,  # the station classifies the adapted model's crops as it did the parent's
            quant_ops=(m.calibration or {}).get("ops", "all"),  # quantized as the parent was (older bundles: all)
            calib_size=int((m.calibration or {}).get("num_images") or 500),  # as many images as the parent's
            overwrite=opts.overwrite,
            name=opts.name or f"{m.name}-adapted",
            seed=opts.seed,
            command="hemaedge adapt " + json.dumps({k: v for k, v in asdict(opts).items() if v is not None}),
        ),
        log=log,
    )
    (work / "adaptation.json").write_text(json.dumps(record, indent=1))
    summary["adaptation"] = record
    log(f"adapted bundle {out}: {sum(counts.values())} cells ({', '.join(f'{c} {n}' for c, n in counts.items())})")
    return summary
