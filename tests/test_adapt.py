"""``hemaedge adapt``: a bundle fitted to a "new microscope" (a colour-shifted toy set) from a few verified cells."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemaedge.calibration.datasets import load_npz  # noqa: E402
from hemaedge.edge.bundle import load_bundle  # noqa: E402
from hemaedge.edge.errors import UsageError  # noqa: E402
from hemaedge.export.adapt import AdaptOptions, adapt  # noqa: E402
from hemaedge.export.exporter import ExportOptions, run_export  # noqa: E402
from test_export import _make_npz  # noqa: E402


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from hemaedge.export.train import Recipe, train

    root = tmp_path_factory.mktemp("adapt")
    data = _make_npz(root / "toymnist.npz")
    s = train(
        Recipe(
            data=str(data), out=str(root / "run"), epochs=3, batch=32, lr=0.05, arch_kwargs={"width": 0.5, "hidden": 32}
        ),
        progress=False,
    )
    ckpt = Path(s["best_checkpoint"])
    run_export(
        ExportOptions(source=str(ckpt), out=str(root / "parent"), data=str(data), int8=True, calib_size=64, views=2),
        log=lambda m: None,
    )
    return root, data, ckpt


def _new_microscope(folder: Path, data: Path, per_class: int, seed: int = 1) -> None:
    """Cells of the toy set under another 'lamp': channels rotated and a warm cast."""
    images = load_npz(data, "val")
    rng = np.random.default_rng(seed)
    for k, name in enumerate(images.classes):
        idx = rng.choice(np.flatnonzero(images.labels == k), per_class, replace=False)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = images.array[i][..., [1, 2, 0]].astype(np.float32) * np.array([1.0, 0.9, 0.75])
            cv2.imwrite(str(folder / name / f"{i}.png"), np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])


def test_adapt_refits_records_its_cells_and_keeps_the_parents_accuracy(parent, tmp_path):
    root, data, ckpt = parent
    _new_microscope(tmp_path / "cells", data, 8)
    opts = AdaptOptions(
        bundle=str(root / "parent"),
        cells=str(tmp_path / "cells"),
        out=str(tmp_path / "adapted"),
        checkpoint=str(ckpt),
        data=str(data),
        epochs=2,
        replay=200,
        max_parent_drop=5.0,
        threads=1,
    )
    summary = adapt(opts, log=lambda m: None)
    b = load_bundle(tmp_path / "adapted")
    rec = b.manifest.provenance["adaptation"]
    assert rec["parent_bundle"] == "parent" and rec["cells_per_class"] == {c: 8 for c in b.manifest.classes}
    assert rec["parent_val_accuracy"] - rec["adapted_val_accuracy"] <= 0.05
    assert rec["cells_digest"] and rec["recipe"]["epochs"] == 2
    assert "int8" in summary["metrics"] and b.manifest.artifact("int8") is not None  # re-exported through the gate
    assert b.manifest.views == 2  # classified on the station as the parent was
    assert b.manifest.calibration["num_images"] == load_bundle(root / "parent").manifest.calibration["num_images"]
    assert json.loads((tmp_path / ".adapted.adapt" / "adaptation.json").read_text())["cells"] == str(tmp_path / "cells")


def test_too_few_cells_or_one_class_are_refused_before_any_work(parent, tmp_path):
    root, data, ckpt = parent
    _new_microscope(tmp_path / "few", data, 3)
    base = dict(bundle=str(root / "parent"), out=str(tmp_path / "x"), checkpoint=str(ckpt), data=str(data))
    with pytest.raises(UsageError, match="too few verified cells to adapt: .* 3 .*at least 5 per class"):
        adapt(AdaptOptions(cells=str(tmp_path / "few"), **base), log=lambda m: None)
    one = tmp_path / "one"
    _new_microscope(one, data, 6)
    for d in sorted(one.iterdir())[1:]:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with pytest.raises(UsageError, match="one class only"):
        adapt(AdaptOptions(cells=str(one), **base), log=lambda m: None)
    with pytest.raises(UsageError, match="not the checkpoint"):
        other = tmp_path / "other.pt"
        other.write_bytes(ckpt.read_bytes() + b"x")
        adapt(AdaptOptions(cells=str(tmp_path / "few"), **{**base, "checkpoint": str(other)}), log=lambda m: None)


def test_the_parents_augmentation_is_read_from_either_trainers_recipe():
    from hemaedge.edge.bundle.manifest import InputSpec
    from hemaedge.export.adapt import parent_augmentation

    # the research trainer (the multi-source bundles) wrote a comma string and always flipped, rotated and zoomed;
    # read as a tuple of characters it would have augmented nothing
    research = {"aug": "od,gain,gamma,blur,noise,jpeg", "framing": "station"}
    assert parent_augmentation(research, InputSpec(64, 64)) == (
        "flip", "rotate", "zoom", "od", "gain", "gamma", "blur", "noise", "jpeg",
    )  # fmt: skip
    assert "odres" in parent_augmentation(research, InputSpec(64, 64, stain_ref=1.6))  # stain-normalised parent
    assert parent_augmentation({"aug": ["flip", "rot90", "stain"]}, InputSpec(28, 28)) == ("flip", "rot90", "stain")
    assert parent_augmentation({}, InputSpec(28, 28)) == ("flip", "rot90")
    # the research trainer's stain turning was an option of its own (degrees), not in its aug string
    assert "stainrot" in parent_augmentation({**research, "stainrot": 10.0}, InputSpec(64, 64))
    assert "stainrot" not in parent_augmentation({**research, "stainrot": 0.0}, InputSpec(64, 64))


def test_the_exported_weights_are_the_moving_average_of_the_fine_tuning(parent, tmp_path):
    """With ``--ema`` the adapted model is the average of the last steps' weights: it lags behind the last step,
    so it lies nearer the parent than the last step's weights do, and ``--ema 0`` returns the last step itself."""
    from hemaedge.export.adapt import find_parent, fine_tune, read_cells

    root, data, ckpt = parent
    _new_microscope(tmp_path / "cells", data, 8)
    base = dict(bundle=str(root / "parent"), cells=str(tmp_path / "cells"), out=str(tmp_path / "x"))
    base.update(checkpoint=str(ckpt), data=str(data), epochs=2, replay=200, max_parent_drop=100.0, threads=1)
    models = {}
    for ema in (0.0, 0.9):
        opts = AdaptOptions(ema=ema, **base)
        p = find_parent(opts)
        models[ema], _ = fine_tune(p, read_cells(opts, p.classes)[0], opts, log=lambda m: None)
    start = {k: v for k, v in p.ck["state_dict"].items() if v.dtype.is_floating_point}

    def distance(model):
        sd = model.state_dict()
        return sum(float((sd[k] - v).pow(2).sum()) for k, v in start.items()) ** 0.5

    assert 0 < distance(models[0.9]) < distance(models[0.0])
    with pytest.raises(UsageError, match="--ema must be in"):
        AdaptOptions(ema=1.0, **base).validate()


def test_holdout_scores_parent_and_adapted_model_on_verified_cells_neither_was_fitted_to(parent, tmp_path):
    """``--holdout``: a share of each class's verified cells is kept out of adapting and both models are scored on
    them; the record says what was adapted on and what was scored. On the toy 'new microscope' (channels rotated)
    the parent is at chance (0.25 here) and the adapted model well above it (0.71)."""
    root, data, ckpt = parent
    _new_microscope(tmp_path / "cells", data, 12)
    base = dict(bundle=str(root / "parent"), cells=str(tmp_path / "cells"), checkpoint=str(ckpt), data=str(data))
    opts = AdaptOptions(
        out=str(tmp_path / "a"), holdout=0.5, epochs=6, ema=0.0, replay=200, max_parent_drop=100.0, **base
    )
    adapt(opts, log=lambda m: None)
    b = load_bundle(tmp_path / "a")
    rec = b.manifest.provenance["adaptation"]
    held = rec["holdout"]
    assert rec["cells_per_class"] == {c: 6 for c in b.manifest.classes}  # what was adapted on
    assert held["cells_per_class"] == {c: 6 for c in b.manifest.classes}
    assert held["cells_digest"] != rec["cells_digest"]
    assert held["adapted_accuracy"] - held["parent_accuracy"] >= 0.2, held
    lo, hi = held["adapted_interval95"]
    assert lo <= held["adapted_accuracy"] <= hi
    with pytest.raises(UsageError, match="--holdout 0.6 leaves 5 .* cells to adapt on .at least 6"):
        adapt(AdaptOptions(out=str(tmp_path / "b"), holdout=0.6, min_per_class=6, **base), log=lambda m: None)


def test_a_model_that_forgets_its_parent_is_moved_back_toward_it_until_it_keeps_the_limit(parent, tmp_path):
    """Fine-tuned hard on the new cells alone (lr 0.003, nine tenths of each batch), the model forgets the parent's
    val. With interpolation (the default) the weights are moved back toward the parent's, a tenth at a time, until
    the parent's val is within ``--max-parent-drop``; with ``--no-interpolate`` the same run is refused."""
    from hemaedge.edge.errors import AccuracyGateError
    from hemaedge.export.adapt import find_parent, fine_tune, read_cells

    root, data, ckpt = parent
    _new_microscope(tmp_path / "cells", data, 8)
    base = dict(bundle=str(root / "parent"), cells=str(tmp_path / "cells"), out=str(tmp_path / "x"))
    base.update(checkpoint=str(ckpt), data=str(data), epochs=3, replay=200, lr=0.003, new_share=0.9, ema=0.0)
    base.update(max_parent_drop=1.0, threads=1)
    opts = AdaptOptions(**base)
    p = find_parent(opts)
    cells = read_cells(opts, p.classes)[0]
    lines = []
    model, numbers = fine_tune(p, cells, opts, log=lines.append)
    assert numbers["parent_val_accuracy"] - numbers["fine_tuned_val_accuracy"] > 0.01, numbers  # it did forget
    assert 0.1 <= numbers["interpolation"] < 1.0
    assert numbers["parent_val_accuracy"] - numbers["adapted_val_accuracy"] <= 0.01
    assert any("of the way from the parent's weights" in line for line in lines)
    start = {k: v for k, v in p.ck["state_dict"].items() if v.dtype.is_floating_point}
    sd = model.state_dict()
    assert any(float((sd[k] - v).abs().max()) > 0 for k, v in start.items())  # not simply the parent back
    with pytest.raises(AccuracyGateError, match="more than --max-parent-drop 1.0: try"):
        fine_tune(p, cells, AdaptOptions(**{**base, "interpolate": False}), log=lambda m: None)
