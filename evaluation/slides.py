"""Slide-level evaluation of the triage: every slide folder through ``hemaedge count``, the call against the truth.

    # normal slides built from labelled single-cell pictures of healthy donors (a normal adult composition)
    python -m hemaedge.evaluation.slides make-normal --cells $HEMAEDGE_DATA/pbc256/val --out runs/slides/normal --n 30
    # every slide folder counted as a technician would (hemaedge count FOLDER --json), the calls tabulated
    python -m hemaedge.evaluation.slides score runs/slides/normal --expect none --bundle BUNDLE --json
    python -m hemaedge.evaluation.slides score $HEMAEDGE_DATA/deepapl/cells --expect acute --bundle BUNDLE \\
        --patients $HEMAEDGE_DATA/deepapl/patients.csv --only runs/deepapl_heldout.txt

    # on a lab's own normal white cells: how often the bundle calls one blast or promyelocyte, and rules with that rate
    python -m hemaedge.evaluation.slides false-calls OUR_NORMAL_CELLS --bundle BUNDLE --out our-triage.json \\
        --bundle-out OUR_BUNDLE   # and a copy of the bundle (the same models) carrying the lab's rate

A normal slide holds ``--wbc`` white cells drawn in proportions from the adult reference ranges (neutrophils
40-75 %, lymphocytes 20-45 %, monocytes 2-10 %, eosinophils 1-6 %, basophils 0-2 %) plus ``--platelets`` platelet
pictures; a picture is used at most once per slide (a set too small for distinct cells across slides reuses
pictures between slides, which the summary says). ``score`` runs the real command in a child process per slide,
so what is scored is exactly what the station does, and reports the calls, the APL probability's AUC when a
patients table gives diagnoses, and each slide's evidence.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# adult peripheral blood reference ranges, percent (the flags use the same: hemaedge.edge.count.flags)
NORMAL_RANGES = {
    "neutrophil": (40.0, 75.0),
    "lymphocyte": (20.0, 45.0),
    "monocyte": (2.0, 10.0),
    "eosinophil": (1.0, 6.0),
    "basophil": (0.0, 2.0),
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def normal_composition(rng: np.random.Generator, wbc: int) -> dict[str, int]:
    """White-cell counts for one normal slide: shares drawn inside the reference ranges, then normalised."""
    while True:
        share = {c: rng.uniform(lo, hi) for c, (lo, hi) in NORMAL_RANGES.items()}
        total = sum(share.values())
        pct = {c: 100 * v / total for c, v in share.items()}
        if all(lo <= pct[c] <= hi for c, (lo, hi) in NORMAL_RANGES.items()):
            break
    counts = rng.multinomial(wbc, [pct[c] / 100 for c in NORMAL_RANGES])
    return dict(zip(NORMAL_RANGES, (int(v) for v in counts)))


def make_normal(cells: Path, out: Path, n: int, wbc: int = 200, platelets: int = 20, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` normal slides as folders of links to single-cell pictures in ``cells/<class>/``."""
    from hemaedge.edge.bundle.vocabulary import canonical_or_same

    rng = np.random.default_rng(seed)
    pool: dict[str, list[Path]] = {}
    for d in sorted(p for p in cells.iterdir() if p.is_dir()):
        pool[canonical_or_same(d.name)] = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    missing = [c for c in [*NORMAL_RANGES, "platelet"] if not pool.get(c)]
    if missing and not (missing == ["platelet"] and platelets == 0):
        raise SystemExit(f"{cells} lacks class folders {missing}")
    reused = False
    slides = []
    for i in range(n):
        for _ in range(100):  # a composition this pool can fill without showing one picture twice on a slide
            comp = normal_composition(rng, wbc)
            if all(k <= len(pool[c]) for c, k in comp.items()):
                break
        else:
            short = {c: len(pool[c]) for c in NORMAL_RANGES if len(pool[c]) < wbc * NORMAL_RANGES[c][1] / 100}
            raise SystemExit(f"{cells}: too few pictures for {wbc}-cell slides ({short}); lower --wbc")
        if platelets:
            comp["platelet"] = platelets
        folder = out / f"normal_{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for cls, k in comp.items():
            reused |= k * n > len(pool[cls])
            for j, src in enumerate(rng.choice(pool[cls], size=k, replace=False)):
                link = folder / f"{cls}_{j:03d}{src.suffix}"
                if not link.exists():
                    os.symlink(src.resolve(), link)
        slides.append({"slide": folder.name, "composition": comp})
    doc = {"cells": str(cells), "slides": slides, "pictures_reused_between_slides": reused, "seed": seed}
    (out / "slides.json").write_text(json.dumps(doc, indent=1))
    return doc


def count_slide(folder: Path, bundle: str | None, out: Path, extra: list[str]) -> dict[str, Any]:
    """``hemaedge count FOLDER --no-tui --json`` in a child process; its JSON (without the per-cell list)."""
    cmd = [sys.executable, "-m", "hemaedge", "count", str(folder), "--no-tui", "--json", "--out", str(out), *extra]
    if bundle:
        cmd += ["--bundle", bundle]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0,) or not res.stdout.strip():
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1], "exit": res.returncode}
    doc = json.loads(res.stdout)
    cells = doc.pop("cells", None) or []
    counts: dict[str, int] = {}
    for c in cells:  # by top class, review cells included: what the triage (and its APL score) sees
        counts[c["top_class"]] = counts.get(c["top_class"], 0) + 1
    doc["top_class_counts"] = counts
    return doc


def false_calls(normal: Path, bundle: str, confidence: float = 0.95, **station_kw: Any) -> dict[str, Any]:
    """The bundle's evidence calls (blast, promyelocyte: what its triage counts) on normal white cells of one
    microscope, through the station's path, and the rule file with the upper bound of that rate.

    The triage asks whether a slide shows more evidence cells than a normal smear would, given the classifier's
    ``false_call_rate``; a rate measured on another microscope's normal cells makes that test too eager (or too
    lax) on this one. ``normal``: single-cell pictures of normal white cells (class folders, e.g. from
    ``hemaedge collect --by-class``, or one folder of them), all from healthy smears of this microscope.
    """
    from hemaedge.edge.bundle.class_groups import default_class_groups
    from hemaedge.edge.count.triage import evidence_classes_of, rate_upper_bound, rules_for_bundle
    from hemaedge.edge.errors import UsageError
    from hemaedge.edge.station import Station
    from hemaedge.evaluation.labelled import IMAGE_EXTS, LabelledCell, read_labelled
    from hemaedge.evaluation.station import MISSED, LabelMatch, evaluate_station

    station = Station.from_bundle(bundle, **station_kw)
    rules = rules_for_bundle(station.bundle)
    if rules is None:
        raise UsageError(f"bundle '{station.manifest.name}' carries no triage rules: nothing to calibrate")
    m = station.manifest
    groups = m.class_groups or default_class_groups(m.classes)
    evidence = evidence_classes_of(rules, groups, m.classes)
    flat = [p for p in sorted(Path(normal).iterdir()) if p.is_file()] if Path(normal).is_dir() else []
    images = [p for p in flat if p.suffix.lower() in IMAGE_EXTS]
    cells = [LabelledCell(p, "normal") for p in images] if images else read_labelled(normal)[0]
    matches = {lab: LabelMatch(lab, (), "normal") for lab in {c.label for c in cells}}
    with station:
        res = evaluate_station(station, cells, matches, data=str(normal))
    called = [p for p in res.predicted if p != MISSED]
    if not called:
        raise UsageError(f"no white cell was found in {normal}: nothing measured")
    k = sum(p in evidence for p in called)
    n = len(called)
    rate = rate_upper_bound(k, n, confidence)
    by_class = {c: called.count(c) for c in evidence if c in called}
    doc = rules.to_dict()
    doc["false_call_rate"] = round(rate, 5)
    doc["version"] = f"{doc.get('version') or 'rules'}+false-calls-{n}"
    doc["source"] = (
        f"false_call_rate: Clopper-Pearson {confidence:.0%} upper bound of {k} evidence calls "
        f"({', '.join(f'{c} {v}' for c, v in by_class.items()) or 'none'}) in {n} normal white cells of {normal}, "
        f"bundle '{m.name}' through the station's path (python -m hemaedge.evaluation.slides false-calls). "
        f"Before: {rules.false_call_rate}. " + str(doc.get("source") or "")
    )
    return {
        "bundle": m.name,
        "normal": str(normal),
        "images": len(cells),
        "white_cells": n,
        "missed": len(cells) - n,
        "evidence_classes": evidence,
        "evidence_calls": k,
        "evidence_by_class": by_class,
        "observed_rate": k / n,
        "false_call_rate": rate,
        "confidence": confidence,
        "bundle_false_call_rate": rules.false_call_rate,
        "rules": doc,
    }


def bundle_with_rules(
    bundle: str, rules_file: Path, out: Path, measured: dict[str, Any], name: str | None = None
) -> Path:
    """A copy of ``bundle`` at ``out`` whose triage rules are ``rules_file`` (re-checksummed in its manifest, which
    records what was measured and the parent bundle). The models are the parent's, byte for byte."""
    import dataclasses
    import shutil

    from hemaedge.edge.bundle import load_bundle, sha256_file
    from hemaedge.edge.bundle.io import add_artifact, write_manifest
    from hemaedge.edge.errors import UsageError

    parent = load_bundle(bundle)
    if Path(out).exists():
        raise UsageError(f"{out} already exists: choose a new folder for the bundle")
    old = next(a for a in parent.manifest.artifacts if a.kind == "triage")
    shutil.copytree(parent.path, out)
    copy = load_bundle(out)
    extra = {
        **copy.manifest.extra,
        "triage_calibration": {
            **{k: v for k, v in measured.items() if k != "rules"},
            "parent_bundle": parent.manifest.name,
            "parent_manifest_sha256": sha256_file(parent.path / "manifest.json"),
        },
    }
    write_manifest(out, dataclasses.replace(copy.manifest, name=name or f"{parent.manifest.name}-local", extra=extra))
    add_artifact(load_bundle(out, verify=False), rules_file, "triage", None, name=old.file)
    return load_bundle(out).path


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """Rank AUC (ties count half); None without both classes."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def score(
    root: Path,
    expect: str,
    bundle: str | None,
    out: Path,
    patients: Path | None = None,
    only: Path | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """Count every slide folder under ``root`` and compare its triage call with ``expect``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if only is not None:
        keep = {ln.strip() for ln in only.read_text().split() if ln.strip()}
        folders = [f for f in folders if f.name in keep]
    diagnosis = {}
    if patients is not None:
        with open(patients, newline="") as f:
            diagnosis = {r["patient"]: r["diagnosis"] for r in csv.DictReader(f)}
    rows = []
    for folder in folders:
        doc = count_slide(folder, bundle, out, extra or [])
        t = doc.get("triage") or {}
        rows.append(
            {
                "slide": folder.name,
                "diagnosis": diagnosis.get(folder.name),
                "call": t.get("call", "error" if "error" in doc else "no triage"),
                "apl_probability": t.get("apl_probability"),
                "white_cells": (doc.get("differential") or {}).get("total_wbc"),
                "evidence_cells": (t.get("evidence") or {}).get("evidence_cells"),
                "p_value": (t.get("evidence") or {}).get("p_value"),
                "rule": t.get("rule") or doc.get("error"),
            }
        )
    right = sum(r["call"] == expect for r in rows)
    result: dict[str, Any] = {
        "root": str(root),
        "expect": expect,
        "slides": len(rows),
        "as_expected": right,
        "rows": rows,
    }
    scored = [r for r in rows if r["apl_probability"] is not None and r["diagnosis"]]
    if scored:
        result["apl_auc"] = auc([r["apl_probability"] for r in scored], [r["diagnosis"] == "APL" for r in scored])
        result["apl_auc_n"] = len(scored)
    return result


# Feature sets tried for the APL score, smallest first; the one with the best leave-one-patient-out AUC on the
# training patients is kept (ties: the smaller set).
APL_FEATURE_SETS = (
    ("promyelocyte",),
    ("promyelocyte", "monocyte"),
    ("promyelocyte", "blast", "monocyte"),
    ("promyelocyte", "blast", "monocyte", "lymphocyte"),
    ("promyelocyte", "blast", "monocyte", "lymphocyte", "neutrophil_segmented", "smudge_cell"),
)


def _log_shares(counts: list[dict[str, int]], features: tuple[str, ...], eps: float) -> np.ndarray:
    rows = []
    for c in counts:
        n = max(1, sum(c.values()))
        rows.append([np.log(c.get(f, 0) / n + eps) for f in features])
    return np.asarray(rows, np.float64)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 3000, lr: float = 0.1):
    """L2-regularised logistic regression on standardised features (gradient descent): ``(coef, b, mean, sd)``."""
    mean, sd = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        w -= lr * (z.T @ (p - y) + l2 * w) / len(y)
        b -= lr * float((p - y).mean())
    return w, b, mean, sd


def fit_apl(counts: list[dict[str, int]], is_apl: list[bool], eps: float = 0.01) -> dict[str, Any]:
    """The APL model of the triage rules (``TriageRules.apl``) from patients' counted compositions.

    Each feature set of ``APL_FEATURE_SETS`` is scored by leave-one-patient-out AUC on these patients only; the best
    is refit on all of them. Give it training patients only: the held-out patients are for ``score``.
    """
    y = np.asarray(is_apl, np.float64)
    if len(y) < 6 or y.sum() < 2 or (1 - y).sum() < 2:
        raise SystemExit("fit-apl needs at least 2 APL and 2 other patients (6 in all)")
    tried = []
    for feats in APL_FEATURE_SETS:
        x = _log_shares(counts, feats, eps)
        scores = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            w, b, mean, sd = _logistic(x[keep], y[keep])
            scores.append(float(((x[i] - mean) / sd) @ w + b))
        tried.append((auc(scores, [bool(v) for v in y]) or 0.0, feats))
    best_auc, feats = max(tried, key=lambda t: (round(t[0], 6), -len(t[1])))
    w, b, mean, sd = _logistic(_log_shares(counts, feats, eps), y)
    return {
        "features": list(feats),
        "coef": [float(v) for v in w],
        "mean": [float(v) for v in mean],
        "sd": [float(v) for v in sd],
        "intercept": float(b),
        "eps": eps,
        "note": f"logistic on log shares, fit on {len(y)} patients ({int(y.sum())} APL); leave-one-patient-out AUC "
        f"{best_auc:.3f} on them",
        "loo_auc": {"+".join(f): round(a, 4) for a, f in tried},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hemaedge.evaluation.slides", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    mk = sub.add_parser("make-normal", help="build normal slides from single-cell pictures of healthy donors")
    mk.add_argument("--cells", required=True, type=Path)
    mk.add_argument("--out", required=True, type=Path)
    mk.add_argument("--n", type=int, default=30)
    mk.add_argument("--wbc", type=int, default=200)
    mk.add_argument("--platelets", type=int, default=20)
    mk.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="count every slide folder and tabulate the triage calls")
    sc.add_argument("root", type=Path)
    sc.add_argument("--expect", required=True, choices=["acute", "chronic", "none"])
    sc.add_argument("--bundle")
    sc.add_argument("--out", type=Path, default=Path("runs/slide-sessions"))
    sc.add_argument("--patients", type=Path, help="patients.csv (patient, diagnosis) for the APL AUC")
    sc.add_argument("--only", type=Path, help="a file listing the slide folders to score (e.g. held-out patients)")
    sc.add_argument("--json", action="store_true")
    fa = sub.add_parser("fit-apl", help="fit the APL score of a triage rule file on training patients' counts")
    fa.add_argument("root", type=Path, help="one folder of single-cell pictures per patient")
    fa.add_argument("--patients", required=True, type=Path, help="patients.csv (patient, diagnosis)")
    fa.add_argument("--only", required=True, type=Path, help="the training patients (never the held-out ones)")
    fa.add_argument("--bundle", required=True)
    fa.add_argument("--rules", required=True, type=Path, help="the rule file to complete (its 'apl' is replaced)")
    fa.add_argument("--out", required=True, type=Path, help="where to write the completed rule file")
    fa.add_argument("--sessions", type=Path, default=Path("runs/apl-sessions"))
    fc = sub.add_parser(
        "false-calls",
        help="on a lab's own normal white cells: how often the bundle calls an evidence class, and triage rules with "
        "that rate (its Clopper-Pearson upper bound)",
    )
    fc.add_argument(
        "normal", type=Path, help="single-cell pictures of normal white cells (class folders or one folder)"
    )
    fc.add_argument("--bundle", required=True)
    fc.add_argument(
        "--out", required=True, type=Path, help="where to write the rule file (ship it: export-model --triage)"
    )
    fc.add_argument("--confidence", type=float, default=0.95)
    fc.add_argument(
        "--bundle-out",
        type=Path,
        help="also write a copy of the bundle carrying these rules (same models; its manifest records the measurement)",
    )
    fc.add_argument("--name", help="the copy's bundle name (default: BUNDLE-local)")
    fc.add_argument("--json", action="store_true")
    a, extra = ap.parse_known_args(argv)
    if a.what == "false-calls":
        if a.bundle_out and a.bundle_out.exists():
            from hemaedge.edge.errors import UsageError

            raise UsageError(f"{a.bundle_out} already exists: choose a new folder for the bundle")
        res = false_calls(a.normal, a.bundle, a.confidence)
        a.out.write_text(json.dumps(res["rules"], indent=1) + "\n")
        if a.bundle_out:
            res["bundle_out"] = str(bundle_with_rules(a.bundle, a.out, a.bundle_out, res, a.name))
        if a.json:
            print(json.dumps({k: v for k, v in res.items() if k != "rules"}, indent=1))
        else:
            print(
                f"{res['evidence_calls']} of {res['white_cells']} normal white cells called "
                f"{'/'.join(res['evidence_classes'])} ({res['observed_rate']:.2%}); false_call_rate "
                f"{res['false_call_rate']:.4f} (bundle: {res['bundle_false_call_rate']}) written to {a.out}"
                + (f"; bundle with these rules: {res['bundle_out']}" if res.get("bundle_out") else "")
            )
        return 0
    if a.what == "fit-apl":
        keep = {ln.strip() for ln in a.only.read_text().split() if ln.strip()}
        with open(a.patients, newline="") as f:
            diagnosis = {r["patient"]: r["diagnosis"] for r in csv.DictReader(f)}
        counts, is_apl = [], []
        for folder in sorted(p for p in a.root.iterdir() if p.is_dir() and p.name in keep):
            doc = count_slide(folder, a.bundle, a.sessions, extra)
            if "error" in doc:
                raise SystemExit(f"{folder.name}: {doc['error']}")
            counts.append(doc["top_class_counts"])
            is_apl.append(diagnosis[folder.name] == "APL")
        rules = json.loads(a.rules.read_text())
        rules["apl"] = fit_apl(counts, is_apl)
        a.out.write_text(json.dumps(rules, indent=1) + "\n")
        print(f"{a.out}: APL score on {rules['apl']['features']} ({rules['apl']['note']})")
        return 0
    if a.what == "make-normal":
        doc = make_normal(a.cells, a.out, a.n, a.wbc, a.platelets, a.seed)
        print(
            f"wrote {len(doc['slides'])} slides to {a.out} (pictures reused between slides: {doc['pictures_reused_between_slides']})"
        )
        return 0
    res = score(a.root, a.expect, a.bundle, a.out, a.patients, a.only, extra)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res["rows"]:
            print(
                f"{r['slide']:14s} {str(r['diagnosis'] or ''):4s} {r['call']:12s} apl={r['apl_probability']} {r['rule']}"
            )
        print(
            f"{res['as_expected']}/{res['slides']} slides called {res['expect']}"
            + (f"; APL AUC {res['apl_auc']:.3f} on {res['apl_auc_n']}" if res.get("apl_auc") is not None else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
