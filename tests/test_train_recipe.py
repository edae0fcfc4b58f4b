"""``hemaedge train``'s invariance recipe: raw-pixel augmentations, several weighted sources, EMA weights, and the
recipe carried into the checkpoint and the bundle. Synthetic data only, tiny models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemaedge.edge.bundle import load_bundle  # noqa: E402
from hemaedge.edge.bundle.manifest import InputSpec  # noqa: E402
from hemaedge.edge.bundle.preprocess import preprocess  # noqa: E402
from hemaedge.edge.errors import UsageError  # noqa: E402
from hemaedge.export import train as T  # noqa: E402

COLOURS = {  # class folder -> nucleus colour (the class is visible in the colour)
    "neutrophil": (150, 40, 160),
    "lymphocyte": (60, 60, 170),
    "eosinophil": (170, 60, 60),
    "monocyte": (60, 150, 60),
}


def _cells(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """``n x 3 x size x size`` raw RGB in 0..1: a stained disc on bright glass (a white-cell crop in miniature)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        disc = (yy - size / 2 - rng.uniform(-3, 3)) ** 2 + (xx - size / 2 - rng.uniform(-3, 3)) ** 2 < (size / 4) ** 2
        img = np.full((size, size, 3), (225, 215, 230), np.float32) + rng.normal(0, 6, (size, size, 3))
        img[disc] = rng.uniform(40, 170, 3) + rng.normal(0, 10, (int(disc.sum()), 3))
        out[i] = np.clip(img, 0, 255)
    return torch.from_numpy(out / 255).permute(0, 3, 1, 2).contiguous()


# PBC's two stains (nuclear, eosin), as ``stain_vectors`` measures them on its white-cell crops
PBC_STAINS = torch.nn.functional.normalize(torch.tensor([[0.456, 0.881, 0.130], [0.630, 0.671, 0.391]]), dim=1)


def _stains(n: int) -> torch.Tensor:
    return PBC_STAINS.expand(n, 2, 3)


@pytest.mark.parametrize("name", T.AUGMENTATIONS)
def test_each_augmentation_keeps_shape_and_range_and_changes_pixels(name):
    x = _cells(64)
    y = T.augment(x, (name,), torch.Generator().manual_seed(3), stains=_stains(64))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    changed = (y - x).abs().flatten(1).max(1).values > 1 / 255
    assert changed.any(), f"{name} left every image as it was"
    if name not in ("gray", "blur", "jpeg", "flip", "rot90"):  # the ones that act on a fraction of the batch
        assert changed.float().mean() > 0.8, f"{name} changed only {changed.float().mean():.2f} of the batch"


def test_every_colour_augmentation_at_zero_strength_is_the_identity():
    x = _cells(16).clamp(0.05, 1)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(T.od_jitter(x, gen, 0.0), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(T.augment(x, T.PHOTOMETRIC, gen, 0.0, _stains(16)), x, atol=1e-4, rtol=0)
    assert (T.augment(x, T.PHOTOMETRIC, gen, 1.0, _stains(16)) - x).abs().max() > 0.05


def _two_stain_cells(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures made of PBC's two stains only (random amounts of each, on glass), and the amounts (``n x P x 2``)."""
    g = torch.Generator().manual_seed(seed)
    amount = torch.rand(n, size * size, 2, generator=g) * torch.tensor([1.2, 0.6])
    amount[:, : size * size // 8, 1] = 0  # nucleus only
    amount[:, size * size // 8 : size * size // 4, 0] = 0  # cytoplasm only
    amount[:, -size * size // 4 :] = 0  # bare glass
    od = amount @ PBC_STAINS
    return torch.pow(10.0, -od).reshape(n, size, size, 3).permute(0, 3, 1, 2).contiguous(), amount


def test_stainrot_turns_each_stain_by_at_most_its_range_and_keeps_the_amounts():
    x, amount = _two_stain_cells(32)
    y = T.stain_rotate(x, torch.Generator().manual_seed(0), _stains(32), 1.0)
    od = -torch.log10(y.clamp(1 / 255, 1)).permute(0, 2, 3, 1).reshape(32, -1, 3)
    # the stains the new picture was made of, given the amounts it was made with (least squares per picture)
    fit = torch.linalg.lstsq(amount.double(), od.double()).solution.float()  # 32 x 2 x 3
    assert torch.allclose(fit.norm(dim=-1), torch.ones(32, 2), atol=0.05)  # same amounts, unit stains (but OD >= 0)
    cos = (torch.nn.functional.normalize(fit, dim=-1) * PBC_STAINS).sum(-1).clamp(-1, 1)
    deg = torch.rad2deg(torch.arccos(cos))
    assert float(deg.max()) <= T.STAINROT_DEG + 1 and float(deg.mean()) > 2  # turned, within the range
    assert float((deg[:, 0] - deg[:, 1]).std()) > 1  # the two stains independently
    torch.testing.assert_close(T.stain_rotate(x, torch.Generator(), _stains(32), 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(T.stain_rotate(x, torch.Generator(), torch.zeros(32, 2, 3), 1.0), x)  # unknown: kept
    with pytest.raises(ValueError, match="session stains"):
        T.augment(x, ("stainrot",), torch.Generator())


def test_od_jitter_changes_the_stain_and_leaves_bare_glass_white():
    x = _cells(32)
    x[:, :, :3, :] = 1.0  # a strip of clean background
    y = T.od_jitter(x, torch.Generator().manual_seed(1), 1.0)
    assert torch.equal(y[:, :, :3, :], x[:, :, :3, :])
    stain = (x.sum(1, keepdim=True) < 1.5).float()  # the disc

    def od(a):
        return (-torch.log10(a.clamp(1 / 255, 1)) * stain).sum((1, 2, 3))

    ratio = od(y) / od(x)
    assert float(ratio.min()) < 0.8 and float(ratio.max()) > 1.2  # pale and heavy smears both drawn


def test_augmentation_meets_the_white_balance_the_station_applies():
    """A lamp-colour gain drawn on raw pixels is what the station's white balance removes: training input equals
    ``preprocess`` of the uint8 crop, and with white balance the gained crop comes out nearly as the plain one."""
    x = _cells(8)
    wb = InputSpec(height=28, width=28, mean=(0.5,) * 3, std=(0.25,) * 3, white_balance=True)
    plain = InputSpec(height=28, width=28, mean=(0.5,) * 3, std=(0.25,) * 3)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(T.to_model_input(x, wb).numpy(), preprocess(u8, wb))
    gained = x * torch.tensor([0.8, 1.0, 0.9])[None, :, None, None]
    assert (T.to_model_input(gained, plain) - T.to_model_input(x, plain)).abs().mean() > 0.2
    assert (T.to_model_input(gained, wb) - T.to_model_input(x, wb)).abs().mean() < 0.05


def test_unknown_augmentation_is_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(UsageError, match="unknown augmentation sharpen"):
        T.train(T.Recipe(data=str(tmp_path / "absent.npz"), out=str(tmp_path / "r"), aug=("flip", "sharpen")))


def test_source_classes_are_matched_through_the_vocabulary_and_clinical_groups():
    pbc8 = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
    have = ("promyelocyte", "neutrophil_segmented", "lymphocyte_variant", "giant_platelet", "blast", "Eosinophils")
    idx, dropped = T.class_map(have, pbc8)
    assert [pbc8[i] if i >= 0 else None for i in idx] == [
        "ig",
        "neutrophil",
        "lymphocyte",
        "platelet",
        None,
        "eosinophil",
    ]
    assert dropped == ["blast"]
    # a coarse label whose group holds two model classes is not guessed
    assert T.class_map(("neutrophil",), ("neutrophil_band", "neutrophil_segmented"))[0].tolist() == [-1]


def test_source_spec_and_weights():
    assert T.parse_source("runs/pbc:0.45") == ("runs/pbc", 0.45)
    assert T.parse_source("runs/pbc") == ("runs/pbc", None)
    assert T.parse_source("C:data") == ("C:data", None)  # not a number: part of the path
    with pytest.raises(UsageError):
        T.parse_source("runs/pbc:0")


def _write_source(root: Path, folders: dict[str, str], n: int, seed: int) -> Path:
    """A class-folder source with train/ and val/ splits; ``folders`` maps folder name -> colour key."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    for split, m in (("train", n), ("val", n // 2)):
        for folder, key in folders.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(m):
                img = np.full((28, 28, 3), 225, np.float32) + rng.normal(0, 8, (28, 28, 3))
                disc = ((yy - rng.uniform(11, 17)) ** 2 + (xx - rng.uniform(11, 17)) ** 2) < rng.uniform(5, 8) ** 2
                img[disc] = np.array(COLOURS[key]) + rng.normal(0, 12, 3)
                cv2.imwrite(str(root / split / folder / f"{i}.png"), np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])
    return root


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    a = _write_source(root / "station_a", {k: k for k in COLOURS}, 30, 0)
    # another lab's names: a finer neutrophil, a plural spelling, and a class the model does not have
    b = _write_source(
        root / "lab_b",
        {
            "neutrophil_segmented": "neutrophil",
            "lymphocyte": "lymphocyte",
            "Eosinophils": "eosinophil",
            "blast": "monocyte",
        },
        20,
        1,
    )
    return root, a, b


@pytest.fixture(scope="module")
def ema_run(two_sources):
    root, a, b = two_sources
    recipe = T.Recipe(
        data=f"{a}:3",
        more_data=(f"{b}:1",),
        out=str(root / "run"),
        epochs=2,
        batch=64,
        samples=1024,
        optimizer="adamw",
        lr=3e-3,
        aug=("flip", "rotate", "zoom", "od", "gain", "gamma", "blur", "noise", "jpeg"),
        aug_strength=0.7,
        ema=0.9,
        white_balance=True,
        arch_kwargs={"width": 0.5, "hidden": 32},
        threads=1,
    )
    return root, recipe, T.train(recipe, progress=False)


def test_sources_are_drawn_by_weight_and_each_is_validated(ema_run):
    root, _, summary = ema_run
    log = [json.loads(x) for x in (root / "run" / "train.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        drawn = r["drawn_by_source"]
        assert sum(drawn.values()) == 1024
        assert abs(drawn["station_a"] / 1024 - 0.75) < 0.06  # weights 3:1
        assert set(r["val_by_source"]) == {"station_a", "lab_b"}
    assert min(log[-1]["val_by_source"].values()) > 0.5  # 4 (3) easy classes: it learned from both
    ck = torch.load(summary["final_checkpoint"], map_location="cpu", weights_only=False)
    b = ck["data"]["sources"][1]
    assert b["name"] == "lab_b" and b["weight"] == 1.0 and b["dropped"] == {"blast": 20}
    assert b["train_images"] == 60 and b["val_images"] == 30  # blast left out of both splits


def test_sample_weights_give_each_source_its_share():
    def src(labels, weight):
        from hemaedge.calibration.datasets import ImageSet

        return T.Source("s", "s", weight, [(ImageSet("s", ("a", "b"), np.asarray(labels)), 1.0)], None, {})

    small, big = src([0, 0, 0, 1], 1.0), src([0] * 40 + [1] * 60, 3.0)
    w = T.sample_weights([small, big], balanced=False)
    assert w[:4].sum() == pytest.approx(0.25) and w[4:].sum() == pytest.approx(0.75)
    w = T.sample_weights([src([0, 0, 0, 1], None), src([0] * 40 + [1] * 60, None)], balanced=False)
    assert w[:4].sum() == pytest.approx(4 / 104)  # no weights: shares follow sizes
    w = T.sample_weights([small], balanced=True)
    assert w[:3].sum() == pytest.approx(w[3])  # balanced: each class of a source equally
    draws = torch.multinomial(torch.from_numpy(T.sample_weights([small, big], False)), 20000, True)
    assert abs(float((draws < 4).float().mean()) - 0.25) < 0.015


def test_ema_weights_are_the_ones_validated_and_saved(ema_run):
    root, _, summary = ema_run
    last = torch.load(root / "run" / "last.pt", map_location="cpu", weights_only=False)
    final = torch.load(summary["final_checkpoint"], map_location="cpu", weights_only=False)
    raw, ema = last["state_dict"], last["ema_state_dict"]
    assert set(final["state_dict"]) == set(ema)
    for k, v in final["state_dict"].items():
        assert torch.equal(v, ema[k]), k
    moved = [k for k, v in raw.items() if v.dtype.is_floating_point and not torch.allclose(v, ema[k])]
    assert len(moved) > len(raw) // 2  # the average is not the trained weights
    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)
    if best["epoch"] == final["epoch"]:
        assert all(torch.equal(v, ema[k]) for k, v in best["state_dict"].items())


def test_ema_update_is_a_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = T.Ema(model, decay=0.9)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first step: decay min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight)


def test_recipe_goes_into_the_checkpoint_and_the_bundle(ema_run, tmp_path):
    from hemaedge.export.exporter import ExportOptions, run_export

    root, recipe, summary = ema_run
    ck = torch.load(summary["final_checkpoint"], map_location="cpu", weights_only=False)
    rec = ck["recipe"]
    assert rec["aug"] == list(recipe.aug) or rec["aug"] == recipe.aug
    assert rec["aug_strength"] == 0.7 and rec["ema"] == 0.9 and rec["samples"] == 1024
    assert rec["data"].endswith("station_a:3") and rec["more_data"][0].endswith("lab_b:1")
    assert ck["input"]["white_balance"] is True
    out = run_export(
        ExportOptions(source=summary["final_checkpoint"], out=str(tmp_path / "b"), data=str(root / "station_a")),
        log=lambda m: None,
    )
    prov = load_bundle(out["bundle"]).manifest.provenance
    assert prov["training_recipe"]["aug_strength"] == 0.7 and prov["training_recipe"]["ema"] == 0.9
    assert list(prov["training_recipe"]["aug"]) == list(recipe.aug)
    assert [s["name"] for s in prov["data"]["train_sources"]] == ["station_a", "lab_b"]


def test_weights_for_some_sources_only_are_refused(two_sources, tmp_path):
    _, a, b = two_sources
    with pytest.raises(UsageError, match="weight to every"):
        T.train(T.Recipe(data=f"{a}:2", more_data=(str(b),), out=str(tmp_path / "r")), progress=False)


def test_cli_options_reach_the_recipe(monkeypatch):
    from hemaedge.export.commands import train as cmd

    seen = {}

    def fake_train(recipe, progress=True):
        seen["recipe"] = recipe
        return {"best_checkpoint": None, "final_checkpoint": "f.pt", "minutes": 0.0}

    monkeypatch.setattr(T, "train", fake_train)
    p = argparse.ArgumentParser()
    cmd.configure(p)
    args = p.parse_args(
        ["--data", "a:0.9", "--data", "b:0.1", "--aug", "od,gain,jpeg", "--aug-strength", "0.5", "--ema", "0.998"]
        + ["--samples", "2000", "--optimizer", "adamw", "--arch", "hemanet"]
    )
    assert cmd.run(args) == 0
    r = seen["recipe"]
    assert (r.data, r.more_data, r.aug, r.aug_strength, r.ema, r.samples) == (
        "a:0.9",
        ("b:0.1",),
        ("od", "gain", "jpeg"),
        0.5,
        0.998,
        2000,
    )


def test_stainrot_training_measures_each_source_s_two_stains(tmp_path):
    """Each source is one session: its two stains are measured once, every sample of it is turned from them."""
    from hemaedge.calibration.datasets import open_dataset

    x, _ = _two_stain_cells(40, size=28, seed=5)
    u8 = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for split in ("train", "val"):
        for k, cls in enumerate(("lymphocyte", "neutrophil")):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(k, 40, 2):
                cv2.imwrite(str(tmp_path / "src" / split / cls / f"{i}.png"), u8[i][..., ::-1])
    part = T._RawSet(open_dataset(tmp_path / "src", "train"), 28, 0, measure_stains=True)
    assert torch.allclose(part.stains, PBC_STAINS, atol=0.02)
    assert torch.allclose(T.set_stains(open_dataset(tmp_path / "src", "val"), 28), PBC_STAINS, atol=0.02)  # adapt's
    assert part[0][3].shape == (2, 3)
    assert not T._RawSet(open_dataset(tmp_path / "src", "train"), 28, 0)[0][3].any()  # not asked: zeros
    recipe = T.Recipe(
        data=str(tmp_path / "src"),
        out=str(tmp_path / "run"),
        epochs=1,
        batch=16,
        optimizer="adamw",
        aug=("flip", "stainrot", "odres"),
        arch_kwargs={"width": 0.5, "hidden": 16},
        threads=1,
    )
    summary = T.train(recipe, progress=False)
    assert Path(summary["final_checkpoint"]).is_file()
