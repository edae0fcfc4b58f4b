"""Training recipes for registered architectures (``hemaedge train``).

Images pass through the runtime's own ``preprocess`` before training, so
training, calibration and the station see identical inputs. Augmentation
(flips, 90-degree rotations, mild per-channel colour jitter) is applied to
the preprocessed tensors; all three are valid for single blood cells.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hemaedge.calibration.datasets import ImageSet, load_folder, open_dataset
from hemaedge.edge.bundle.manifest import InputSpec
from hemaedge.edge.bundle.preprocess import preprocess
from hemaedge.edge.errors import UsageError
from hemaedge.export import checkpoint
from hemaedge.export.models import DEFAULTS, build
from torch import nn


@dataclass
class Recipe:
    """Everything that defines a training run (saved in the checkpoint and log)."""

    arch: str = "bloodcnn5"
    data: str = ""
    out: str = "runs/bloodcnn5"
    epochs: int = 20
    batch: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    aug: tuple[str, ...] = ("flip", "rot90")
    balanced: bool = False
    early_stop: int = 0
    label_smoothing: float = 0.0
    img_size: int = 0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int = 0
    workers: int = 0
    max_minutes: float = 0.0
    white_balance: bool = False
    extra_data: tuple[str, ...] = ()
    extra_repeat: int = 1
    init: str = ""


def _stats(images: ImageSet, size: int, white_balance: bool, n: int = 2000, seed: int = 0):
    """Per-channel mean/std of training pixels as the model will see them (after resize / white balance)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    raw = InputSpec(height=size, width=size, white_balance=white_balance)
    x = np.concatenate([preprocess(images.images(idx[s : s + 256]), raw) for s in range(0, len(idx), 256)])
    return tuple(float(v) for v in x.mean((0, 2, 3))), tuple(float(v) for v in x.std((0, 2, 3)))


def _torch_white_balance(raw: torch.Tensor) -> torch.Tensor:
    """``hemaedge.edge.bundle.preprocess.white_balance`` for ``N x C x H x W`` tensors in 0..1."""
    from hemaedge.edge.bundle.preprocess import WB_PERCENTILE, WB_TARGET

    bright = raw.mean(1).flatten(1)
    cut = torch.quantile(bright, WB_PERCENTILE / 100, dim=1, keepdim=True)
    mask = (bright >= cut).unsqueeze(1).float()
    bg = (raw.flatten(2) * mask).sum(2) / mask.sum(2).clamp(min=1)
    return (raw * (WB_TARGET / 255 / bg.clamp(min=1e-3))[:, :, None, None]).clamp(0, 1)


def stain_jitter(x: torch.Tensor, spec: InputSpec, gen: torch.Generator) -> torch.Tensor:
    """Emulate another microscope / stain on a normalised batch: saturation, gamma, channel gains, brightness.

    Works on the pixels as the model sees them before normalisation, and
    white-balances again afterwards when the bundle does (as the station would).
    """
    n = x.shape[0]
    mean = torch.tensor(spec.mean)[None, :, None, None]
    std = torch.tensor(spec.std)[None, :, None, None]
    raw = (x * std + mean).clamp(1e-4, 1)

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    grey = raw.mean(1, keepdim=True)
    raw = grey + u(0.35, 1.3, 1, 1, 1) * (raw - grey)
    raw = raw.clamp(1e-4, 1) ** torch.exp(u(np.log(0.6), np.log(1.5), 1, 1, 1))
    raw = raw * u(0.85, 1.15, raw.shape[1], 1, 1) * u(0.85, 1.1, 1, 1, 1)
    raw = _torch_white_balance(raw.clamp(0, 1)) if spec.white_balance else raw.clamp(0, 1)
    return (raw - mean) / std


def zoom(x: torch.Tensor, gen: torch.Generator, lo: float = 0.8, hi: float = 1.25, shift: float = 0.08) -> torch.Tensor:
    """Random scale (cell size within the crop) and small shifts, borders reflected."""
    n = x.shape[0]
    s = lo + (hi - lo) * torch.rand(n, generator=gen)
    t = shift * (torch.rand(n, 2, generator=gen) * 2 - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / s
    theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = t
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def stage_lineage(path: str | Path, ck: dict) -> list[dict]:
    """The training stages behind checkpoint ``ck`` (read from ``path``), oldest first, itself last.

    A fine-tuned model (``--init``) records this, so its bundle says every recipe that made it,
    not only the last one.
    """
    from hemaedge.edge.bundle import sha256_file

    own = {
        "checkpoint": str(path),
        "sha256": sha256_file(path),
        "recipe": ck.get("recipe"),
        "epoch": ck.get("epoch"),
        "metrics": ck.get("metrics"),
    }
    return [*(ck.get("lineage") or []), own]


def augment(x: torch.Tensor, aug: tuple[str, ...], gen: torch.Generator, spec: InputSpec | None = None) -> torch.Tensor:
    """Augment a normalised ``N x C x H x W`` batch.

    ``flip`` and ``rot90`` (valid for single cells), ``color`` (per-channel
    gain/offset), ``stain`` (see ``stain_jitter``; needs ``spec``) and ``zoom``.
    """
    n = x.shape[0]
    if "stain" in aug and spec is not None:
        x = stain_jitter(x, spec, gen)
    if "zoom" in aug:
        x = zoom(x, gen)
    if "flip" in aug:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    if "rot90" in aug and x.shape[2] == x.shape[3]:
        k = torch.randint(0, 4, (n,), generator=gen)
        out = x.clone()
        for r in (1, 2, 3):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(x[sel], r, (2, 3))
        x = out
    if "color" in aug:
        gain = 1 + 0.15 * (torch.rand(n, x.shape[1], 1, 1, generator=gen) * 2 - 1)
        bias = 0.15 * (torch.rand(n, x.shape[1], 1, 1, generator=gen) * 2 - 1)
        x = x * gain + bias
    return x


class _FolderData(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, spec: InputSpec):
        self.images, self.spec = images, spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(preprocess([self.images.image(i)], self.spec)[0]), int(self.images.labels[i])


def _loader(images: ImageSet, spec: InputSpec, batch: int, shuffle: bool, balanced: bool, workers: int, seed: int):
    """Batches of preprocessed tensors: in memory for npz sets, decoded on the fly for folders."""
    if images.array is not None:
        data = torch.utils.data.TensorDataset(
            torch.from_numpy(preprocess(images.array, spec)), torch.from_numpy(images.labels)
        )
    else:
        data = _FolderData(images, spec)
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if balanced and shuffle:
        counts = np.bincount(images.labels, minlength=len(images.classes)).astype(np.float64)
        w = 1.0 / np.maximum(counts[images.labels], 1)
        sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(w), len(images), generator=gen)
    return torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=gen,
        drop_last=False,
        persistent_workers=workers > 0,
    )


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a loader."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(torch.softmax(model(x), 1).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


def train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Train, checkpoint the best epoch on ``val``, log every epoch; resumable from ``out/last.pt``.

    Returns:
        A summary dict (best epoch, val accuracy, paths, minutes).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    tr = open_dataset(recipe.data, "train")
    va = open_dataset(recipe.data, "val", classes=tr.classes)
    size = recipe.img_size or DEFAULTS.get(recipe.arch, {}).get("input_size") or tr.image(0).shape[0]
    mean, std = _stats(tr, size, recipe.white_balance)
    spec = InputSpec(height=size, width=size, mean=mean, std=std, white_balance=recipe.white_balance)
    model = build(recipe.arch, len(tr.classes), **recipe.arch_kwargs)
    lineage: list[dict] = []
    if recipe.init:  # fine-tune: start from another run's weights (same architecture, same classes)
        init = checkpoint.load(recipe.init)
        lineage = stage_lineage(recipe.init, init)
        if init.get("classes") not in (None, list(tr.classes)):
            raise UsageError(f"--init {recipe.init} was trained on classes {init['classes']}, not {list(tr.classes)}")
        model.load_state_dict(init["state_dict"])
        if init.get("input"):  # keep the normalisation the weights were trained with
            mean, std = tuple(init["input"]["mean"]), tuple(init["input"]["std"])
            spec = InputSpec(height=size, width=size, mean=mean, std=std, white_balance=recipe.white_balance)
    tl = _loader(tr, spec, recipe.batch, True, recipe.balanced, recipe.workers, recipe.seed)
    extra_digests = []
    if recipe.extra_data:
        if tr.array is None:
            raise UsageError("--extra-data is supported with in-memory (.npz) training sets")
        xs, ys = [torch.from_numpy(preprocess(tr.array, spec))], [torch.from_numpy(tr.labels)]
        for path in recipe.extra_data:
            ex = load_folder(path, None, classes=tr.classes)
            extra_digests.append(
                {"path": str(path), "images": len(ex), "digest": ex.digest, "repeat": recipe.extra_repeat}
            )
            xe = torch.from_numpy(
                np.concatenate(
                    [preprocess(ex.images(np.arange(s, min(s + 256, len(ex)))), spec) for s in range(0, len(ex), 256)]
                )
            )
            xs += [xe] * recipe.extra_repeat
            ys += [torch.from_numpy(ex.labels)] * recipe.extra_repeat
        data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
        tl = torch.utils.data.DataLoader(
            data, batch_size=recipe.batch, shuffle=True, generator=torch.Generator().manual_seed(recipe.seed)
        )
    vl = _loader(va, spec, 256, False, False, recipe.workers, recipe.seed)
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
        )
    elif recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        raise UsageError(f"optimizer must be sgd or adam, not {recipe.optimizer!r}")
    steps = len(tl)
    if recipe.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps)
    elif recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * steps)
    elif recipe.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=2)
    elif recipe.schedule == "none":
        sched = None
    else:
        raise UsageError(f"schedule must be onecycle, cosine, plateau or none, not {recipe.schedule!r}")
    per_step = recipe.schedule in ("onecycle", "cosine")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    start, best, best_epoch, stale = 0, -1.0, -1, 0
    last = out / "last.pt"
    if last.exists():  # resume
        ck = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler"):
            sched.load_state_dict(ck["scheduler"])
        start, best, best_epoch, stale = ck["epoch"] + 1, ck["best"], ck["best_epoch"], ck["stale"]
        gen.set_state(ck["gen"])
    meta = dict(
        arch=recipe.arch,
        arch_kwargs=recipe.arch_kwargs,
        classes=list(tr.classes),
        input=asdict(spec),
        data={"path": str(recipe.data), "train_digest": tr.digest, "val_digest": va.digest, "extra": extra_digests},
        recipe=asdict(recipe),
        lineage=lineage,
    )
    log = open(out / "train.log.jsonl", "a", encoding="utf-8")
    t0 = time.time()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        ep_task = bar.add_task("epochs", total=recipe.epochs, completed=start, info="")
        for epoch in range(start, recipe.epochs):
            model.train()
            st = bar.add_task(f"epoch {epoch + 1}", total=steps, info="")
            tot, correct, seen = 0.0, 0, 0
            for x, y in tl:
                x = augment(x, recipe.aug, gen, spec)
                logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if per_step:
                    sched.step()
                tot += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.update(st, advance=1, info=f"loss {tot / seen:.3f} acc {correct / seen:.3f}")
            bar.remove_task(st)
            probs, labels = predict(model, vl)
            val_acc = float((probs.argmax(1) == labels).mean())
            if sched is not None and not per_step:
                sched.step(val_acc)
            improved = val_acc > best
            if improved:
                best, best_epoch, stale = val_acc, epoch, 0
                checkpoint.save(
                    out / "best.pt",
                    **meta,
                    state_dict=model.state_dict(),
                    epoch=epoch,
                    metrics={"val_accuracy": val_acc},
                )
            else:
                stale += 1
            rec = {
                "epoch": epoch + 1,
                "train_loss": tot / seen,
                "train_acc": correct / seen,
                "val_acc": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "best": best,
                "seconds": round(time.time() - t0, 1),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            torch.save(
                {
                    "state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "epoch": epoch,
                    "best": best,
                    "best_epoch": best_epoch,
                    "stale": stale,
                    "gen": gen.get_state(),
                },
                last,
            )
            bar.update(ep_task, advance=1, info=f"val {val_acc:.4f} best {best:.4f}@{best_epoch + 1}")
            if recipe.early_stop and stale >= recipe.early_stop:
                break
            if recipe.max_minutes and (time.time() - t0) / 60 > recipe.max_minutes:
                break
    log.close()
    return {
        "best_checkpoint": str(out / "best.pt"),
        "best_epoch": best_epoch + 1,
        "val_accuracy": best,
        "minutes": round((time.time() - t0) / 60, 2),
        "log": str(out / "train.log.jsonl"),
    }
