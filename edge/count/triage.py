"""Slide-level triage: seed 3's hierarchy, built on the session's counted cells and a versioned rule file.

A session is one slide of one patient. The call is a pure function of the cells' classes and the rules, so it is
easy to test on synthetic compositions and easy to audit::

    step 1  evidence of leukaemia?   cells called blast (or abnormal promyelocyte) far above what the classifier
                                     calls on normal smears: a one-sided binomial test of k calls in n white cells
                                     against the classifier's measured false-call rate (``false_call_rate``); or a
                                     chronic pattern (step 2)
    step 2  which pattern?           chronic when a published chronic pattern holds (CML: left shift with
                                     basophilia; CLL: lymphocytosis with smudge cells) and blasts stay below the
                                     acute share; otherwise acute. APL suspicion: a patient-level score learned on
                                     the discovery cohort (``apl``), reported as ``apl_probability``.
            insufficient             too few white cells counted, or too many in review, to say either way.

Borderline evidence (a blast seen, not yet significant) asks the count for more cells (``wants_more``) instead of
stopping at the target, up to ``max_cells``.

Rules live in a JSON file (``triage.json``) that the bundle lists as an artifact (``manifest.triage``): versioned,
checksummed with the bundle, and recorded in every session's summary. Stdlib + math only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CALLS = ("acute", "chronic", "none", "insufficient")


@dataclass(frozen=True)
class ChronicRule:
    """One published chronic-leukaemia pattern: every ``min_percent`` group share reached, every ``max_percent`` not
    exceeded (percent of the white cells counted). Groups are clinical group keys (``class_groups``)."""

    name: str
    min_percent: dict[str, float]
    max_percent: dict[str, float] = field(default_factory=dict)
    reference: str = ""


@dataclass(frozen=True)
class AplModel:
    """A patient-level logistic score: ``sigmoid(intercept + sum(coef * (log(share + eps) - mean) / sd))``.

    ``features`` are class names of the bundle (the share is of all cells counted, white cells and the rest).
    """

    features: tuple[str, ...]
    coef: tuple[float, ...]
    mean: tuple[float, ...]
    sd: tuple[float, ...]
    intercept: float
    eps: float = 0.01
    note: str = ""

    def probability(self, counts: Mapping[str, int]) -> float | None:
        """The APL probability for a composition (None without any cell)."""
        n = sum(counts.values())
        if n == 0:
            return None
        z = self.intercept
        for f, c, m, s in zip(self.features, self.coef, self.mean, self.sd):
            z += c * (math.log(counts.get(f, 0) / n + self.eps) - m) / (s or 1.0)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True)
class TriageRules:
    """The declarative rules of the slide call (see the module docstring); ``version`` names them in every report.

    Attributes:
        version: e.g. ``"hemaedge-triage/1"``.
        evidence_groups: Clinical groups whose cells are evidence of leukaemia (``blasts``).
        evidence_classes: Single classes that are evidence too (``promyelocyte``: abnormal promyelocytes, APL).
        false_call_rate: The share of normal white cells the classifier calls an evidence class (measured on
            normal cells held out from training; the null rate of the test).
        alpha: Evidence when P(at least k calls | n cells, false_call_rate) < alpha.
        borderline_alpha: Between ``alpha`` and this: borderline (the count asks for more cells).
        min_cells: Fewer white cells than this: ``insufficient`` (unless the evidence is already significant).
        max_review_share: More of the counted cells in review than this: ``insufficient``.
        acute_blast_percent: Blasts at or above this share of white cells make a chronic pattern acute (WHO: 20 %).
        extend_by: White cells to add to the target while the evidence is borderline.
        max_cells: Never extend the target beyond this.
        chronic: The chronic patterns.
        apl: The APL score, or None.
        source: Where the numbers come from (for the audit).
    """

    version: str
    false_call_rate: float
    evidence_groups: tuple[str, ...] = ("blasts",)
    evidence_classes: tuple[str, ...] = ("promyelocyte",)
    alpha: float = 0.001
    borderline_alpha: float = 0.05
    min_cells: int = 100
    max_review_share: float = 0.25
    acute_blast_percent: float = 20.0
    extend_by: int = 100
    max_cells: int = 500
    chronic: tuple[ChronicRule, ...] = ()
    apl: AplModel | None = None
    source: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TriageRules:
        """Parse the JSON form (``triage.json``); raises ValueError naming the first bad field."""
        try:
            chronic = tuple(ChronicRule(**r) for r in d.get("chronic", ()))
            apl = d.get("apl")
            model = None
            if apl:
                model = AplModel(
                    tuple(apl["features"]),
                    tuple(float(v) for v in apl["coef"]),
                    tuple(float(v) for v in apl["mean"]),
                    tuple(float(v) for v in apl["sd"]),
                    float(apl["intercept"]),
                    float(apl.get("eps", 0.01)),
                    str(apl.get("note", "")),
                )
                if not len(model.features) == len(model.coef) == len(model.mean) == len(model.sd):
                    raise ValueError("apl: features, coef, mean and sd differ in length")
            rules = cls(
                version=str(d["version"]),
                false_call_rate=float(d["false_call_rate"]),
                evidence_groups=tuple(d.get("evidence_groups", ("blasts",))),
                evidence_classes=tuple(d.get("evidence_classes", ("promyelocyte",))),
                alpha=float(d.get("alpha", 0.001)),
                borderline_alpha=float(d.get("borderline_alpha", 0.05)),
                min_cells=int(d.get("min_cells", 100)),
                max_review_share=float(d.get("max_review_share", 0.25)),
                acute_blast_percent=float(d.get("acute_blast_percent", 20.0)),
                extend_by=int(d.get("extend_by", 100)),
                max_cells=int(d.get("max_cells", 500)),
                chronic=chronic,
                apl=model,
                source=str(d.get("source", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"triage rules: missing or malformed field {exc}") from exc
        if not 0.0 <= rules.false_call_rate < 1.0:
            raise ValueError("triage rules: false_call_rate must lie in [0, 1)")
        if not 0.0 < rules.alpha <= rules.borderline_alpha < 1.0:
            raise ValueError("triage rules: need 0 < alpha <= borderline_alpha < 1")
        return rules

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


def load_rules(path: str | Path) -> TriageRules:
    """Read a triage rule file."""
    return TriageRules.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Triage:
    """The slide call and everything behind it (``summary.json``'s ``triage``).

    Attributes:
        call: ``acute``, ``chronic``, ``none`` or ``insufficient``.
        apl_probability: The APL score, None without a model or cells.
        evidence: The numbers the call rests on.
        rule: The rule version and the branch taken, in words.
        wants_more: The evidence is borderline: count more cells before deciding.
        cells: Ids of the cells behind the evidence (for the report's gallery), when the caller gave ids.
    """

    call: str
    apl_probability: float | None
    evidence: dict[str, Any]
    rule: str
    wants_more: bool = False
    cells: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "call": self.call,
            "apl_probability": None if self.apl_probability is None else round(self.apl_probability, 4),
            "evidence": self.evidence,
            "rule": self.rule,
            "wants_more": self.wants_more,
            "cells": list(self.cells),
        }


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sums; n up to a few thousand)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def evidence_classes_of(rules: TriageRules, groups: Mapping[str, Sequence[str]], known: Iterable[str]) -> list[str]:
    """The classes whose cells are evidence under ``rules``: its groups' members, and its single classes among
    ``known`` (the classes counted, or the bundle's)."""
    known = set(known)
    return sorted(
        {c for g in rules.evidence_groups for c in groups.get(g, ())}
        | {c for c in rules.evidence_classes if c in known}
    )


def rate_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson upper bound of a rate seen ``k`` times in ``n`` (two-sided ``confidence``): the
    ``false_call_rate`` a rule file should carry after ``k`` evidence calls among ``n`` normal white cells."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n and n > 0, not k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    if k == n:
        return 1.0
    alpha = (1.0 - confidence) / 2.0
    lo, hi = k / n, 1.0
    for _ in range(60):  # P(X <= k | n, p) falls as p grows: bisect where it crosses alpha
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if 1.0 - binomial_tail(k + 1, n, mid) > alpha else (lo, mid)
    return hi


def _share(counts: Mapping[str, int], members: Sequence[str], n: int) -> float:
    return 100.0 * sum(counts.get(c, 0) for c in members) / n if n else 0.0


def triage(
    counts: Mapping[str, int],
    wbc: int,
    review: int,
    groups: Mapping[str, Sequence[str]],
    rules: TriageRules,
    evidence_cells: Sequence[int] = (),
) -> Triage:
    """The slide call for one session.

    Args:
        counts: Cells per class, by the class each cell is *counted* as, review cells by their top class (a cell
            the model was unsure of still shows what it looked like most).
        wbc: White cells counted (the differential's total, review included).
        review: Of those, cells in review.
        groups: The bundle's clinical groups (``class_groups``).
        rules: The rule file.
        evidence_cells: Ids of the cells called an evidence class (shown with the call).
    """
    evidence_classes = evidence_classes_of(rules, groups, counts)
    k = sum(counts.get(c, 0) for c in evidence_classes)
    p = binomial_tail(k, wbc, rules.false_call_rate) if wbc else 1.0
    blasts = _share(counts, [c for g in rules.evidence_groups for c in groups.get(g, ())], wbc)
    # Blasts and their equivalents (WHO: the abnormal promyelocytes of APL count as blasts) against the acute threshold:
    # an APL slide full of promyelocytes has the "left shift" of a CML pattern, and is acute.
    equivalents = 100.0 * k / wbc if wbc else 0.0
    shares = {g: round(_share(counts, members, wbc), 2) for g, members in groups.items()}
    chronic = [r for r in rules.chronic if _pattern(r, groups, counts, wbc)]
    evidence: dict[str, Any] = {
        "white_cells": wbc,
        "review": review,
        "evidence_classes": evidence_classes,
        "evidence_cells": k,
        "expected_on_a_normal_smear": round(rules.false_call_rate * wbc, 2),
        "p_value": float(f"{p:.3g}"),
        "blast_percent": round(blasts, 2),
        "blast_equivalent_percent": round(equivalents, 2),
        "group_percent": shares,
        "chronic_patterns": [r.name for r in chronic],
        "rules": rules.version,
    }
    apl = rules.apl.probability(counts) if rules.apl is not None else None
    significant = k > 0 and p < rules.alpha
    borderline = k > 0 and not significant and p < rules.borderline_alpha
    wants_more = borderline and wbc < rules.max_cells
    ids = tuple(evidence_cells)

    def out(call: str, why: str, more: bool = False) -> Triage:
        return Triage(call, apl, evidence, f"{rules.version}: {why}", more, ids)

    if significant:
        if chronic and equivalents < rules.acute_blast_percent:
            return out("chronic", f"{k} evidence cells in {wbc} (p={p:.2g}) with the {chronic[0].name} pattern")
        return out("acute", f"{k} evidence cells in {wbc} white cells: p={p:.2g} < {rules.alpha} on a normal smear")
    if wbc < rules.min_cells:
        return out("insufficient", f"{wbc} white cells counted, fewer than {rules.min_cells}", wants_more)
    if wbc and review / wbc > rules.max_review_share:
        return out("insufficient", f"{review} of {wbc} cells in review (over {rules.max_review_share:.0%})")
    if chronic and equivalents < rules.acute_blast_percent:
        return out("chronic", f"the {chronic[0].name} pattern ({chronic[0].reference})".replace(" ()", ""))
    if borderline:  # never "none" while the evidence is borderline: more cells, or an expert, must settle it
        if wants_more:
            return out(
                "insufficient", f"{k} evidence cells in {wbc} is borderline (p={p:.2g}): more cells needed", True
            )
        return out("insufficient", f"{k} evidence cells in {wbc} is borderline (p={p:.2g}): an expert should look")
    return out("none", f"{k} evidence cells in {wbc} white cells is what a normal smear shows (p={p:.2g})")


def _pattern(rule: ChronicRule, groups: Mapping[str, Sequence[str]], counts: Mapping[str, int], wbc: int) -> bool:
    if not wbc:
        return False
    for g, lo in rule.min_percent.items():
        if g not in groups or _share(counts, groups[g], wbc) < lo:
            return False
    return all(_share(counts, groups.get(g, ()), wbc) <= hi for g, hi in rule.max_percent.items())


def rules_for_bundle(bundle: Any) -> TriageRules | None:
    """The triage rules a bundle carries (its ``triage`` artifact, checksummed with the bundle), else None."""
    art = next((a for a in bundle.manifest.artifacts if a.kind == "triage"), None)
    if art is None:
        return None
    try:
        return load_rules(Path(bundle.path) / art.file)
    except (OSError, ValueError) as exc:
        from hemaedge.edge.errors import BundleError

        raise BundleError(f"bundle '{bundle.manifest.name}': triage rules {art.file} cannot be read ({exc})") from exc


def session_triage(cells: Sequence[Any], settings: Mapping[str, Any]) -> Triage | None:
    """The call for a session's stored cells under the rules it was counted with (None: the bundle has none).

    A pure function of the cells (their top class and review decision; ``review_class`` when a person verified
    them) and the session's ``triage_rules`` setting: the report, ``summary.json`` and the review page all call
    this, so they agree.
    """
    raw = settings.get("triage_rules")
    if not raw:
        return None
    rules = TriageRules.from_dict(raw)
    from hemaedge.edge.count.flags import ClassGroups

    classes = list(settings["classes"])
    groups = ClassGroups.build(classes, settings.get("class_groups"))
    counts = dict.fromkeys(classes, 0)
    wbc = review = 0
    evidence_names = {c for g in rules.evidence_groups for c in groups.groups.get(g, ())} | set(rules.evidence_classes)
    ids = []
    for c in cells:
        name = getattr(c, "verified_class", None) or c.class_name
        counts[name] = counts.get(name, 0) + 1
        in_diff = groups.differential[classes.index(name)] if name in classes else True
        if in_diff or c.review:
            wbc += 1
            review += bool(c.review) and not getattr(c, "verified_class", None)
        if name in evidence_names:
            ids.append(int(c.id))
    return triage(counts, wbc, review, groups.groups, rules, ids)
