"""Training the white-cell detector (``hemaedge train-detector``).

Frames of the training sources are brought to the working scale with the runtime's own red-cell
measurement (``export.detector.data``), mixed into canvases with zoom, colour, blur and phone damage
(``export.detector.augment``) and fitted with CenterNet's losses: a penalty-reduced focal loss on the
centre heatmap and L1 on log box size and centre offset, at the centres only.

The last epoch's weights are kept: no checkpoint is chosen on the frames it is scored on. Scoring
(``score``) runs each held-out frame exactly as the station does: measure its scale, resize, white
balance, run, decode (``hemaedge.edge.segment.learned``), and matches boxes one-to-one at IoU >= 0.5
(``hemaedge.edge.segment.matching.match``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hemaedge.edge.segment.learned import DetectorSpec, decode, prepare, to_frame
from hemaedge.edge.segment.matching import match
from hemaedge.edge.segment.scale import Scale, estimate_scale, frame_guess
from hemaedge.evaluation.groundtruth import Tally
from hemaedge.export import checkpoint
from hemaedge.export.detector.augment import make_canvas, targets
from hemaedge.export.detector.data import KEEP, SOURCES, LabelledFrame, load_frames
from hemaedge.export.detector.model import STRIDE, WBCNet

ARCH = "wbcnet"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@dataclass
class DetectorRecipe:
    """Everything that defines a detector training run (saved in the checkpoint and the bundle's manifest)."""

    data: str = ""
    out: str = "runs/detector"
    hold_out: tuple[str, ...] = ()
    px_per_um: float = 1.75
    canvas: int = 128
    batch: int = 32
    epochs: int = 30
    steps_per_epoch: int = 100
    lr: float = 3e-3
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (12, 24, 48, 64)
    head: int = 24
    depth16: int = 2
    phone_p: float = 0.3
    stain_p: float = 0.0
    zoom: tuple[float, float] = (0.75, 1.33)
    wide_zoom: tuple[float, float] = (0.5, 2.0)
    source_balance: float = 0.5
    seed: int = 0
    threads: int = 1
    max_minutes: float = 0.0
    bccd_splits: tuple[str, ...] = ("train",)
    extra: dict[str, Any] = field(default_factory=dict)


def focal_loss(logit: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos) * weight
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def losses(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor):
    """``(total, heatmap, size, offset)`` for a batch."""
    lh = focal_loss(out[:, 0], heat, weight)
    n = mask.sum().clamp(min=1)
    m = mask.unsqueeze(1)
    ls = (torch.abs(out[:, 1:3] - reg[:, 0:2]) * m).sum() / n
    lo = (torch.abs(out[:, 3:5] - reg[:, 2:4]) * m).sum() / n
    return lh + ls + lo, lh, ls, lo


def _sampler(frames: Sequence[LabelledFrame], balance: float, rng: np.random.Generator) -> Callable[[], list]:
    """Frames drawn with each source weighted ``count ** balance`` (0: sources equal; 1: frames equal)."""
    by: dict[str, list] = {}
    for f in frames:
        by.setdefault(f.source, []).append(f)
    names = sorted(by)
    w = np.asarray([len(by[n]) ** balance for n in names], np.float64)
    w /= w.sum()

    def draw(k: int = 4) -> list:
        out = []
        for _ in range(k):
            src = names[int(rng.choice(len(names), p=w))]
            out.append(by[src][int(rng.integers(len(by[src])))])
        return out

    return draw


def batch(frames_draw: Callable, rng: np.random.Generator, r: DetectorRecipe) -> tuple[torch.Tensor, ...]:
    """One training batch: inputs and CenterNet targets."""
    xs, hs, rs, ms, ws = [], [], [], [], []
    for _ in range(r.batch):
        img, boxes, ignore = make_canvas(
            frames_draw(4),
            rng,
            r.canvas,
            KEEP,
            tuple(r.zoom),
            tuple(r.wide_zoom),
            phone_p=r.phone_p,
            stain_p=r.stain_p,
        )
        x = img[:, :, ::-1].astype(np.float32) / 255.0
        x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
        xs.append(x.transpose(2, 0, 1))
        h, reg, m, w = targets(boxes, ignore, r.canvas, STRIDE)
        hs.append(h)
        rs.append(reg)
        ms.append(m)
        ws.append(w)
    return tuple(torch.from_numpy(np.stack(a)) for a in (xs, hs, rs, ms, ws))


class TorchRunner:
    """Runs a torch detector on frames exactly as ``LearnedSegmenter`` does (for scoring during training)."""

    def __init__(self, model: torch.nn.Module, spec: DetectorSpec, scale_cache: dict | None = None):
        self.model, self.spec = model.eval(), spec
        self.cache = scale_cache if scale_cache is not None else {}

    def scale(self, key: str, bgr: np.ndarray) -> Scale:
        """The frame's measured scale (cached by ``key``)."""
        if key not in self.cache:
            self.cache[key] = estimate_scale(bgr) or frame_guess(bgr.shape)
        return self.cache[key]

    def __call__(self, bgr: np.ndarray, key: str, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (frame pixels) and scores."""
        scale = self.scale(key, bgr)
        h, w = bgr.shape[:2]
        f = min(scale.factor_to(self.spec.px_per_um), self.spec.max_side / max(h, w))
        x, size = prepare(bgr, f, self.spec, MEAN, STD)
        with torch.no_grad():
            out = self.model(torch.from_numpy(x))[0].numpy()
        boxes, scores = decode(out, self.spec, size, threshold)
        return to_frame(boxes, size, (h, w)), scores


def score(
    run: Callable[[np.ndarray, str], tuple[np.ndarray, np.ndarray]],
    items: Sequence,
    thresholds: Sequence[float] = (),
    iou: float = 0.5,
) -> dict[str, Any]:
    """Recall/precision per source (``items``: ``Labelled`` records) at the bundle threshold and, from the same
    raw detections, at each of ``thresholds`` (``run`` must then be called with threshold ``min(thresholds)``)."""
    import cv2

    tallies: dict[str, Tally] = {"all": Tally()}
    sweep: dict[float, dict[str, Tally]] = {t: {"all": Tally()} for t in thresholds}
    for it in items:
        img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
        if img is None:
            continue
        t0 = time.process_time()
        boxes, scores = run(img, str(it.path))
        dt = time.process_time() - t0
        if thresholds:
            for t, tl in sweep.items():
                k = scores >= t
                c = match(boxes[k], scores[k], it.boxes, iou)
                tl.setdefault(it.source, Tally()).add(*c, dt)
                tl["all"].add(*c, dt)
        c = match(boxes, scores, it.boxes, iou)
        tallies.setdefault(it.source, Tally()).add(*c, dt)
        tallies["all"].add(*c, dt)
    out: dict[str, Any] = {k: v.as_dict() for k, v in tallies.items()}
    if thresholds:
        out["sweep"] = {f"{t:.2f}": {k: v.as_dict() for k, v in tl.items()} for t, tl in sweep.items()}
    return out


def train(r: DetectorRecipe, log: Callable[[str], None] = print, evaluate: Callable | None = None) -> dict[str, Any]:
    """Train, save ``<out>/last.pt`` (and ``train.log.jsonl``), return a summary."""
    torch.manual_seed(r.seed)
    if r.threads:
        torch.set_num_threads(r.threads)
    rng = np.random.default_rng(r.seed)
    out = Path(r.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(r.data)
    t_load = time.time()
    frames = load_frames(root, r.px_per_um, tuple(r.bccd_splits), cache=out.parent / ".cache")
    frames = [f for f in frames if f.source not in r.hold_out]
    counts: dict[str, int] = {}
    for f in frames:
        counts[f.source] = counts.get(f.source, 0) + 1
    log(
        f"training frames: {counts} (held out: {', '.join(r.hold_out) or 'none'}), loaded in {time.time() - t_load:.0f} s"
    )
    draw = _sampler(frames, r.source_balance, rng)
    model = WBCNet(tuple(r.widths), r.head, r.depth16)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    total = r.epochs * r.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=0.1)
    started = time.time()
    logf = (out / "train.log.jsonl").open("w")
    step = 0
    for epoch in range(1, r.epochs + 1):
        model.train()
        acc = np.zeros(4)
        for _ in range(r.steps_per_epoch):
            x, heat, reg, mask, weight = batch(draw, rng, r)
            o = model(x)
            loss, lh, ls, lo = losses(o, heat, reg, mask, weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            acc += [float(loss), float(lh), float(ls), float(lo)]
        acc /= r.steps_per_epoch
        rec = {"epoch": epoch, "loss": acc[0], "heat": acc[1], "size": acc[2], "offset": acc[3]}
        rec["minutes"] = round((time.time() - started) / 60, 2)
        if evaluate is not None and (epoch % 10 == 0 or epoch == r.epochs):
            rec["eval"] = evaluate(model, epoch)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        log(
            f"epoch {epoch}/{r.epochs} loss {acc[0]:.3f} (heat {acc[1]:.3f} size {acc[2]:.3f} offset {acc[3]:.3f}) "
            f"{rec['minutes']:.1f} min" + (f" eval {json.dumps(rec['eval'])}" if "eval" in rec else "")
        )
        save(model, r, out / "last.pt", epoch, counts)
        if r.max_minutes and (time.time() - started) / 60 > r.max_minutes:
            log(f"stopping after epoch {epoch}: --max-minutes {r.max_minutes}")
            break
    logf.close()
    return {"checkpoint": str(out / "last.pt"), "epochs": epoch, "minutes": round((time.time() - started) / 60, 1)}


def save(model: WBCNet, r: DetectorRecipe, path: Path, epoch: int, counts: dict[str, int]) -> None:
    """A hemaedge checkpoint of the detector (architecture, weights, recipe, input contract)."""
    checkpoint.save(
        path,
        arch=ARCH,
        arch_kwargs=model.config(),
        state_dict=model.state_dict(),
        classes=["wbc"],
        task="detect",
        epoch=epoch,
        recipe=_plain(asdict(r)),
        train_frames=counts,
        input={"mean": list(MEAN), "std": list(STD), "colour_order": "RGB", "white_balance": True},
        detector={"px_per_um": r.px_per_um, "stride": STRIDE, "canvas": r.canvas},
    )


def load_model(path: str | Path) -> tuple[WBCNet, dict[str, Any]]:
    """The detector in a checkpoint (eval mode) and the checkpoint's fields."""
    ck = checkpoint.load(path)
    if ck.get("task") != "detect" or ck.get("arch") != ARCH:
        from hemaedge.edge.errors import InputError

        raise InputError(f"{path} is not a white-cell detector checkpoint (hemaedge train-detector)")
    kw = dict(ck.get("arch_kwargs") or {})
    kw["widths"] = tuple(kw.get("widths", (12, 24, 48, 64)))
    model = WBCNet(**kw)
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def held_out_items(root: Path, sources: Sequence[str], bccd_split: str = "val") -> list:
    """Labelled frames to score: TXL-PBC frames of ``sources`` (BCCD-source ones included) and, when ``BCCD`` is among
    them or ``bccd_split`` is given, BCCD frames of that split (VOC labels, source ``BCCD-VOC``)."""
    from hemaedge.evaluation.groundtruth import bccd_items, txl_items
    from hemaedge.export.detector.data import source_of

    items = []
    for it in txl_items(root / "txl-pbc", "all"):
        src = source_of(it.source)
        if src in sources:
            items.append(type(it)(it.path, it.boxes, src, it.split))
    if bccd_split:
        items += list(bccd_items(root / "bccd", bccd_split))
    return items


__all__ = [
    "ARCH",
    "MEAN",
    "STD",
    "SOURCES",
    "DetectorRecipe",
    "TorchRunner",
    "held_out_items",
    "load_model",
    "score",
    "train",
]


def _cosine(step: int, total: int) -> float:  # pragma: no cover - kept for experiments
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
