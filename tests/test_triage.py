"""Slide triage (seed 3's hierarchy on cells): every rule branch on synthetic compositions, and the count asking
for more cells when a blast is seen and the evidence is borderline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
from hemaedge.edge.count.triage import (
    AplModel,
    ChronicRule,
    TriageRules,
    binomial_tail,
    rate_upper_bound,
    session_triage,
    triage,
)

CLASSES = [
    "blast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "neutrophil_band",
    "neutrophil_segmented",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "erythroblast",
    "smudge_cell",
    "platelet",
]
GROUPS = {
    "blasts": ["blast"],
    "immature_granulocytes": ["promyelocyte", "myelocyte", "metamyelocyte"],
    "neutrophils": ["neutrophil_band", "neutrophil_segmented"],
    "lymphocytes": ["lymphocyte"],
    "monocytes": ["monocyte"],
    "eosinophils": ["eosinophil"],
    "basophils": ["basophil"],
    "nrbc": ["erythroblast"],
    "smudge_cells": ["smudge_cell"],
    "platelets": ["platelet"],
}
RULES = TriageRules(
    version="test/1",
    false_call_rate=0.005,
    chronic=(
        ChronicRule("CML", {"immature_granulocytes": 10.0, "basophils": 3.0}, reference="left shift with basophilia"),
        ChronicRule("CLL", {"lymphocytes": 70.0, "smudge_cells": 5.0}, reference="lymphocytosis with smudge cells"),
    ),
)
NORMAL = {
    "neutrophil_segmented": 120,
    "neutrophil_band": 4,
    "lymphocyte": 56,
    "monocyte": 12,
    "eosinophil": 6,
    "basophil": 2,
}


def call(counts, review=0, rules=RULES):
    wbc = sum(v for k, v in counts.items() if k not in ("erythroblast", "smudge_cell", "platelet"))
    return triage(counts, wbc, review, GROUPS, rules)


def test_binomial_tail_is_exact():
    for n, p, k in ((10, 0.3, 4), (200, 0.005, 3), (50, 0.5, 25)):
        brute = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, p) == pytest.approx(brute, rel=1e-9)
    assert binomial_tail(0, 10, 0.1) == 1.0 and binomial_tail(11, 10, 0.1) == 0.0


def test_the_false_call_rate_bound_is_clopper_pearson():
    assert rate_upper_bound(5, 10) == pytest.approx(0.8129, abs=1e-4)  # the textbook 95 % interval 0.187-0.813
    assert rate_upper_bound(0, 100) == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)  # closed form for k = 0
    assert rate_upper_bound(1, 498) == pytest.approx(0.0111, abs=1e-4)  # the shipped rules' 0.011
    assert rate_upper_bound(10, 10) == 1.0 and rate_upper_bound(1, 498, 0.99) > rate_upper_bound(1, 498)
    for bad in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError):
            rate_upper_bound(*bad)


@pytest.mark.data
def test_false_calls_on_a_labs_normal_cells_reproduce_the_shipped_rate_and_write_rules(data_root, tmp_path):
    """``slides false-calls``: the blast bundle's evidence calls on normal white cells through the station's path.
    On half A of PBC val (the cells its shipped rate was measured on) it finds the same 1 of 498."""
    from hemaedge.edge.count.triage import load_rules
    from hemaedge.edge.models import default_bundle_path
    from hemaedge.evaluation.groundtruth import hash_half
    from hemaedge.evaluation.slides import main

    val = data_root / "pbc256" / "val"
    if not val.is_dir():
        pytest.skip(f"data not found: {val}")
    normal = tmp_path / "normal"
    for c in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"):
        (normal / c).mkdir(parents=True)
        for f in sorted((val / c).iterdir()):
            if hash_half(f.name) == "a":
                (normal / c / f.name).symlink_to(f.resolve())  # a relative data root would break the link
    out, copy = tmp_path / "rules.json", tmp_path / "ours"
    args = ["false-calls", str(normal), "--bundle", "hemanet64-blast", "--out", str(out), "--bundle-out", str(copy)]
    assert main(args) == 0
    rules = load_rules(out)
    assert rules.false_call_rate == pytest.approx(rate_upper_bound(1, 498), abs=1e-5)
    assert rules.version.endswith("+false-calls-498") and "1 evidence calls (promyelocyte 1) in 498" in rules.source
    assert rules.apl == load_rules(default_bundle_path("hemanet64-blast") / "triage.json").apl  # only the rate changes
    # the copy carries them, checksummed, with the parent's models byte for byte
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.count.triage import rules_for_bundle

    ours, parent = load_bundle(copy), load_bundle("hemanet64-blast")
    assert rules_for_bundle(ours) == rules and ours.manifest.name == "hemanet64-blast-local"
    assert ours.manifest.extra["triage_calibration"]["evidence_calls"] == 1
    models = {a.file: a.sha256 for a in parent.manifest.artifacts if a.kind == "onnx"}
    assert models and {a.file: a.sha256 for a in ours.manifest.artifacts if a.kind == "onnx"} == models
    from hemaedge.edge.errors import UsageError

    with pytest.raises(UsageError, match="already exists"):  # never over an existing folder, refused before measuring
        main(args)


def test_a_normal_smear_is_none():
    t = call(NORMAL)
    assert t.call == "none" and not t.wants_more and t.evidence["evidence_cells"] == 0


def test_one_blast_in_a_normal_smear_is_what_normal_smears_show():
    t = call({**NORMAL, "blast": 1})
    assert t.call == "none" and not t.wants_more and t.evidence["p_value"] > 0.05


def test_significant_blasts_are_acute():
    t = call({**NORMAL, "blast": 8})
    assert t.call == "acute" and t.evidence["p_value"] < RULES.alpha and "evidence cells" in t.rule


def test_abnormal_promyelocytes_are_evidence_too():
    assert call({**NORMAL, "promyelocyte": 8}).call == "acute"


def test_borderline_blasts_ask_for_more_cells():
    t = call({**NORMAL, "blast": 4})  # 4 in 204: p ~ 0.02, between alpha and 0.05
    assert RULES.alpha <= t.evidence["p_value"] < RULES.borderline_alpha
    assert t.call == "insufficient" and t.wants_more and "more cells needed" in t.rule  # never "none" while borderline
    big = {k: v * 3 for k, v in NORMAL.items()}
    t = call({**big, "blast": 4}, rules=RULES)
    assert not t.wants_more and t.call == "none"  # 4 in 604 is what a normal smear shows


def test_borderline_never_asks_beyond_the_rules_limit():
    big = {k: v * 3 for k, v in NORMAL.items()}  # 600 white cells, above max_cells 500
    rules = TriageRules(version="t", false_call_rate=0.02)
    t = triage({**big, "blast": 20}, 620, 0, GROUPS, rules)
    assert rules.alpha <= t.evidence["p_value"] < 0.05 and not t.wants_more  # p = 0.027
    assert t.call == "insufficient" and "an expert should look" in t.rule  # borderline at the limit: never "none"


def test_cml_pattern_is_chronic_and_turns_acute_with_many_blasts():
    cml = {
        "neutrophil_segmented": 100,
        "myelocyte": 30,
        "metamyelocyte": 20,
        "basophil": 12,
        "lymphocyte": 30,
        "blast": 8,
    }
    t = call(cml)
    assert t.call == "chronic" and t.evidence["chronic_patterns"] == ["CML"]
    assert call({**cml, "blast": 80}).call == "acute"  # blasts >= 20 %: blast phase, acute


def test_an_apl_slide_full_of_promyelocytes_is_acute_even_with_a_left_shift():
    """Abnormal promyelocytes are blast equivalents (WHO): with basophils >= 3 % the immature granulocytes form the
    CML pattern's left shift, but 25 % blast equivalents make the slide acute."""
    apl = {"neutrophil_segmented": 90, "promyelocyte": 50, "myelocyte": 4, "basophil": 8, "lymphocyte": 48}
    t = call(apl)
    assert t.evidence["chronic_patterns"] == ["CML"] and t.evidence["blast_percent"] == 0.0
    assert t.evidence["blast_equivalent_percent"] == 25.0 and t.call == "acute"


def test_cll_pattern_is_chronic_without_blasts():
    t = call({"lymphocyte": 170, "neutrophil_segmented": 25, "monocyte": 5, "smudge_cell": 20})
    assert t.call == "chronic" and t.evidence["chronic_patterns"] == ["CLL"] and t.evidence["evidence_cells"] == 0


def test_too_few_cells_or_too_much_review_is_insufficient():
    assert call({"neutrophil_segmented": 30, "lymphocyte": 10}).call == "insufficient"
    assert call(NORMAL, review=80).call == "insufficient"
    assert call({"blast": 20, "neutrophil_segmented": 10}).call == "acute"  # significant evidence needs no minimum


def test_apl_probability_is_the_logistic_score_of_the_composition():
    apl = AplModel(("promyelocyte", "monocyte"), (2.0, -1.0), (-3.0, -3.0), (1.0, 1.0), -0.5)
    rules = TriageRules(version="t", false_call_rate=0.005, apl=apl)
    counts = {**NORMAL, "promyelocyte": 40, "blast": 30}
    n = sum(counts.values())
    z = -0.5 + 2.0 * (math.log(40 / n + 0.01) + 3.0) - 1.0 * (math.log(12 / n + 0.01) + 3.0)
    t = call(counts, rules=rules)
    assert t.call == "acute" and t.apl_probability == pytest.approx(1 / (1 + math.exp(-z)))
    assert call(NORMAL).apl_probability is None  # no APL model in RULES


def test_rules_round_trip_and_bad_rules_are_refused():
    again = TriageRules.from_dict(json.loads(json.dumps(RULES.to_dict())))
    assert again == RULES
    with pytest.raises(ValueError, match="false_call_rate"):
        TriageRules.from_dict({"version": "x"})
    with pytest.raises(ValueError, match="alpha"):
        TriageRules.from_dict({"version": "x", "false_call_rate": 0.01, "alpha": 0.2, "borderline_alpha": 0.05})


@dataclass
class Cell:
    id: int
    class_name: str
    review: bool = False
    verified_class: str | None = None


def test_session_triage_uses_verified_classes_and_names_the_cells_behind_it():
    settings = {"classes": CLASSES, "class_groups": GROUPS, "triage_rules": RULES.to_dict()}
    cells = [Cell(i, "neutrophil_segmented") for i in range(150)] + [Cell(150 + i, "blast") for i in range(8)]
    t = session_triage(cells, settings)
    assert t.call == "acute" and t.cells == tuple(range(150, 158))
    for c in cells[150:]:
        c.verified_class = "lymphocyte"  # a technician reclassified every "blast"
    assert session_triage(cells, settings).call == "none"
    assert session_triage(cells, {"classes": CLASSES}) is None  # a bundle without rules makes no call


def test_a_borderline_count_counts_on_until_the_evidence_decides(tmp_path):
    """Every fifth cell is called a blast: at 20 white cells that is borderline against a 5 % false-call rate, so
    the session raises its target (20 -> 30 -> 40) instead of stopping, and at 40 the evidence is significant."""
    import fake_segment
    import numpy as np
    from helpers import tiny_bundle
    from hemaedge.edge.bundle import load_bundle
    from hemaedge.edge.count import DifferentialCounter
    from hemaedge.edge.counting import CountingSession
    from hemaedge.edge.sources import open_source
    from hemaedge.edge.station import CellFinder, Station
    from hemaedge.edge.store import SessionStore

    rules = TriageRules(
        version="test/extend", false_call_rate=0.05, borderline_alpha=0.2, min_cells=5, extend_by=10, max_cells=40
    )
    bundle = load_bundle(tiny_bundle(tmp_path / "b", classes=tuple(CLASSES), int8=False, triage=rules.to_dict()))

    class EveryFifthBlast:
        name, precision = "fake", "fp32"
        seen = 0

        def classify(self, batch):
            p = np.full((len(batch), len(CLASSES)), 0.01, np.float32)
            for row in p:
                row[0 if self.seen % 5 == 4 else CLASSES.index("neutrophil_segmented")] = 0.9
                self.seen += 1
            return p

    station = Station(bundle, fake_segment.TruthSegmenter(), EveryFifthBlast())
    assert station.triage_rules == rules
    store = SessionStore.create(tmp_path / "s", {"classes": CLASSES, "target": 20, "triage_rules": rules.to_dict()})
    counter = DifferentialCounter(CLASSES, 20, 0.6, GROUPS)
    src = open_source("synthetic://?seed=11&frames=3000&pan=4&wbc=4")
    finder = CellFinder(station.segmenter, bundle.manifest.crop, quality=fake_segment.always_ok)
    session = CountingSession(src, station, store, counter, finder=finder)
    with src:
        res = session.run()
    assert res.state == "done" and counter.target == 40 and counter.total == 40
    assert store.settings["target"] == 40  # a resumed session keeps the raised target
    t = session_triage(store.read_cells(), {**store.settings, "class_groups": GROUPS})
    assert t.call == "acute" and t.evidence["evidence_cells"] == 8


def test_normal_slides_never_show_a_picture_twice_and_say_when_the_pool_is_too_small(tmp_path):
    from hemaedge.evaluation.slides import NORMAL_RANGES, make_normal

    cells = tmp_path / "cells"
    sizes = {"neutrophil": 160, "lymphocyte": 95, "monocyte": 25, "eosinophil": 15, "basophil": 8, "platelet": 30}
    for cls, n in sizes.items():
        (cells / cls).mkdir(parents=True)
        for i in range(n):
            (cells / cls / f"{i}.png").write_bytes(b"")
    doc = make_normal(cells, tmp_path / "slides", n=5, wbc=200, platelets=20)
    for slide in doc["slides"]:
        pictures = [p.resolve() for p in (tmp_path / "slides" / slide["slide"]).iterdir()]
        assert len(pictures) == len(set(pictures)) == 220
        comp = slide["composition"]
        assert all(comp[c] <= sizes[c] for c in NORMAL_RANGES)
    with pytest.raises(SystemExit, match="too few pictures for 400-cell slides"):
        make_normal(cells, tmp_path / "big", n=1, wbc=400, platelets=0)


def test_fit_apl_learns_a_score_that_separates_apl_by_its_promyelocytes_and_monocytes():
    import numpy as np
    from hemaedge.edge.count.triage import AplModel
    from hemaedge.evaluation.slides import auc, fit_apl

    rng = np.random.default_rng(0)
    counts, is_apl = [], []
    for i in range(24):
        apl = i % 3 == 0
        c = {"blast": int(rng.integers(20, 60)), "lymphocyte": int(rng.integers(20, 40)), "smudge_cell": 10}
        c["promyelocyte"] = int(rng.integers(15, 40)) if apl else int(rng.integers(0, 4))
        c["monocyte"] = int(rng.integers(0, 3)) if apl else int(rng.integers(5, 30))
        c["neutrophil_segmented"] = int(rng.integers(5, 30))
        counts.append(c)
        is_apl.append(apl)
    apl = fit_apl(counts, is_apl)
    assert "promyelocyte" in apl["features"] and max(apl["loo_auc"].values()) > 0.9
    model = AplModel(tuple(apl["features"]), tuple(apl["coef"]), tuple(apl["mean"]), tuple(apl["sd"]), apl["intercept"])
    assert auc([model.probability(c) for c in counts], is_apl) > 0.95
    with pytest.raises(SystemExit, match="at least 2 APL"):
        fit_apl(counts[:4], [True, False, False, False])
