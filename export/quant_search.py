"""Accuracy-aware INT8: search calibration settings, then keep the most sensitive nodes in float.

``export-model --int8 --search`` calls ``search_int8`` when plain INT8 misses
the accuracy gate. The search, cheapest first:

1. **Calibration settings**: every ``method`` (entropy, percentile, minmax) x
   per-channel / per-tensor weights (per-channel first), quantized with the
   pipeline's own ``hemaedge.export.quantize.quantize_int8`` so every candidate uses
   the same symmetric QDQ format the station gets. The first setting within
   the gate wins. ``entropy`` here is a real KL threshold search
   (``entropy_bins``): ONNX Runtime's stock entropy calibration with
   ``quantize_static`` has a single candidate threshold and equals min-max.
2. **Mixed precision**: with the best setting of step 1, rank the quantized
   nodes by how much quantization noise each one *adds*: run the FP32 graph
   and the fake-quantized QDQ graph on calibration batches with every
   intermediate tensor exposed; per tensor, the noise-to-signal ratio against
   FP32, per channel and averaged over channels; a node's score is
   ``NSR(outputs) - NSR(inputs)``, the noise from quantizing its inputs and
   weights. (A cumulative error would favour late layers; a per-tensor ratio
   misses outlier channels, whose energy dominates the tensor, so it looks
   fine while every other channel is crushed to a few levels.) ONNX Runtime
   puts Q/DQ on a tensor when its producer *or* a consumer is quantized, so
   a node goes to float together with the producers of its inputs. The top-k
   nodes (with those producers) are passed to ``nodes_to_exclude`` with
   k = 1, 2, 4, 8 ... until the drop is within the gate, then bisected down
   to the smallest passing k. The first time a float set more than halves
   the drop without passing, the other calibration settings are re-tried with
   it (the least bad setting with everything quantized - often per-tensor
   when an outlier breaks all of them - is rarely the best once the outlier
   path is float).

Each step is logged (setting, accuracy, drop, seconds) and the result says
which nodes stayed float. Quantization-aware training is the last resort and
needs a GPU; it is not attempted here.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.export.quantize import METHODS, quantize_int8

SQNR_CAP_DB = 80.0  # an exact tensor (graph input, weights-free path) counts as 80 dB


@dataclass
class SearchResult:
    """What the search settled on.

    Attributes:
        path: The INT8 (possibly mixed-precision) QDQ model written.
        method: Calibration method (``minmax`` / ``entropy`` / ``percentile``).
        per_channel: Per-channel weight scales.
        excluded_nodes: ONNX node names kept in float (``nodes_to_exclude``).
        drop: FP32 minus INT8 accuracy, in percentage points.
        log: One dict per candidate tried (stage, setting, accuracy, drop, seconds).
        accuracy: INT8 accuracy of ``path`` (same units as ``eval_fn``).
        baseline: FP32 accuracy.
        passed: Whether ``drop <= max_drop``.
        excluded_labels: Human labels of the float nodes (layer names from weights).
        ranking: The sensitivity ranking ``[(node, label, SQNR dB of the noise it adds), ...]`` (top 20).
    """

    path: Path
    method: str
    per_channel: bool
    excluded_nodes: list[str]
    drop: float
    log: list[dict[str, Any]]
    accuracy: float = float("nan")
    baseline: float = float("nan")
    passed: bool = False
    excluded_labels: list[str] = field(default_factory=list)
    ranking: list[tuple[str, str, float]] = field(default_factory=list)


def search_int8(
    fp32_onnx: str | Path,
    calib_reader_factory: Callable[[], Any],
    eval_fn: Callable[[Path], float],
    max_drop: float,
    *,
    out: str | Path | None = None,
    baseline: float | None = None,
    log: Callable[[str], None] = print,
    settings: Sequence[tuple[str, bool]] | None = None,
    skip: Sequence[tuple[str, bool]] = (),
    analysis_batches: int = 4,
    max_float_fraction: float = 0.5,
    max_trials: int = 12,
    ops: str = "all",
) -> SearchResult:
    """Find an INT8 model of ``fp32_onnx`` whose accuracy drop is within ``max_drop`` points.

    Args:
        fp32_onnx: The FP32 ONNX model (as exported; pre-processing happens inside ``quantize_int8``).
        calib_reader_factory: Returns a fresh ``CalibrationDataReader`` (each quantization consumes one).
        eval_fn: ``eval_fn(onnx_path) -> accuracy`` as a fraction (e.g. top-1 on the validation split).
        max_drop: The gate, in percentage points of accuracy.
        out: Where to write the chosen model (default: next to ``fp32_onnx`` as ``*.int8.onnx``).
        baseline: FP32 accuracy if already measured (else ``eval_fn(fp32_onnx)``).
        log: Progress sink (one line per candidate).
        settings: ``(method, per_channel)`` candidates for step 1, in order (default: all methods,
            per-channel first).
        skip: Settings already known to fail (e.g. the plain export's), not re-run.
        analysis_batches: Calibration batches used to rank node sensitivity.
        max_float_fraction: Never keep more than this share of the quantized nodes in float.
        max_trials: Quantize+evaluate rounds allowed in step 2.
        ops: Where every candidate's Q/DQ pairs go (``quantize.QUANT_OPS``).

    Returns:
        A ``SearchResult``; ``passed`` is False (and the best model found is written) when
        nothing met the gate: the caller's gate then fails the export with the numbers.
    """
    fp32 = Path(fp32_onnx)
    out = Path(out) if out is not None else fp32.with_suffix(".int8.onnx")
    if baseline is None:
        baseline = float(eval_fn(fp32))
    plan = _Plan(
        max_drop,
        list(settings) if settings is not None else [(m, pc) for pc in (True, False) for m in _ORDER],
        {(m, bool(pc)) for m, pc in skip},
        analysis_batches,
        max_float_fraction,
        max_trials,
    )
    with tempfile.TemporaryDirectory(prefix="hemaedge-qsearch-") as tmpdir:
        trials = _Trials(fp32, Path(tmpdir), calib_reader_factory, eval_fn, baseline, log, ops)
        first = _calibration_settings(plan, trials)
        if first.passed:
            drop, (method, per_channel) = first.best.drop, first.best.setting
            shutil.copyfile(first.best.path, out)
            return SearchResult(
                out, method, per_channel, [], drop, trials.records, baseline - drop / 100, baseline, True
            )
        ranking = _rank(fp32, first.best, calib_reader_factory, plan, log)
        fallback = _float_fallback(plan, trials, ranking, first.best)
        k_best = _smallest_passing(plan, trials, ranking, fallback)
        return _result(plan, trials, ranking, k_best, fallback.tried[k_best], out)


@dataclass
class _Plan:
    """The gate and the search's limits, as ``search_int8`` was asked for them."""

    max_drop: float
    settings: list[tuple[str, bool]]  # step 1's candidates, in order (also re-tried with a float set)
    skip: set[tuple[str, bool]]
    analysis_batches: int
    max_float_fraction: float
    max_trials: int


@dataclass
class _Candidate:
    """One quantized candidate: its accuracy drop (points), its file and its calibration setting."""

    drop: float
    path: Path
    setting: tuple[str, bool]


@dataclass
class _Trials:
    """Quantizes and evaluates candidates, logging each; keeps the records and never runs one twice."""

    fp32: Path
    tmp: Path
    calib_reader_factory: Callable[[], Any]
    eval_fn: Callable[[Path], float]
    baseline: float
    log: Callable[[str], None]
    ops: str = "all"
    records: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[tuple, tuple[float, Path]] = field(default_factory=dict)

    def run(self, stage: str, method: str, per_channel: bool, exclude: Sequence[str], name: str) -> tuple[float, Path]:
        """``(drop, path)`` of ``method``/``per_channel`` with ``exclude`` kept in float."""
        key = (method, per_channel, tuple(sorted(exclude)))
        if key in self.seen:  # overlapping groups can give the same float set for two k
            return self.seen[key]
        t = time.time()
        path = self.tmp / f"{name}.onnx"
        with entropy_bins() if method == "entropy" else contextlib.nullcontext():
            quantize_int8(
                self.fp32, path, self.calib_reader_factory(), method, per_channel, exclude=list(exclude), ops=self.ops
            )
        acc = float(self.eval_fn(path))
        drop = (self.baseline - acc) * 100
        rec = {
            "stage": stage,
            "method": method,
            "per_channel": per_channel,
            "float_nodes": len(exclude),
            "accuracy": round(acc, 5),
            "drop": round(drop, 3),
            "seconds": round(time.time() - t, 1),
        }
        self.records.append(rec)
        self.log(
            f"  int8 search ({stage}) {method}, {'per-channel' if per_channel else 'per-tensor'}"
            f"{f', {len(exclude)} float nodes' if exclude else ''}: accuracy {acc:.4f}, drop {drop:+.2f} pts"
        )
        self.seen[key] = (drop, path)
        return drop, path


@dataclass
class _Settings:
    """Step 1's outcome: the least bad calibration setting, and whether it met the gate there."""

    best: _Candidate
    passed: bool


@dataclass
class _Ranking:
    """Step 2's ranking: quantized nodes, worst first, with their labels and how many may go to float."""

    nodes: list[tuple[str, str, float, list[str]]]  # rank_nodes: (node, label, SQNR dB, float set)
    labels: dict[str, str]
    top: list[tuple[str, str, float]]  # the first 20, for the result
    limit: int  # most nodes kept in float (max_float_fraction)

    def excluded_for(self, k: int) -> list[str]:
        """The nodes kept in float for the ``k`` worst: each with the producers of its inputs."""
        return list(dict.fromkeys(m for _, _, _, group in self.nodes[:k] for m in group))


@dataclass
class _Fallback:
    """The float sets tried (by k, 0 = everything quantized), the first passing k and the last failing one."""

    tried: dict[int, _Candidate]
    passing: int | None
    failing: int


def _calibration_settings(plan: _Plan, trials: _Trials) -> _Settings:
    """Step 1: every calibration setting in order until one is within the gate; else the least bad one."""
    best: _Candidate | None = None
    for method, per_channel in plan.settings:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        if (method, per_channel) in plan.skip:
            continue
        drop, path = trials.run("calibration", method, per_channel, (), f"{method}_{int(per_channel)}")
        if best is None or drop < best.drop:
            best = _Candidate(drop, path, (method, per_channel))
        if drop <= plan.max_drop:
            return _Settings(_Candidate(drop, path, (method, per_channel)), True)
    if best is None:  # every setting skipped: re-run the first so there is a model to analyse
        method, per_channel = plan.settings[0]
        drop, path = trials.run("calibration", method, per_channel, (), "base")
        best = _Candidate(drop, path, (method, per_channel))
    return _Settings(best, False)


def _rank(
    fp32: Path, start: _Candidate, calib_reader_factory: Callable[[], Any], plan: _Plan, log: Callable[[str], None]
) -> _Ranking:
    """Step 2a: rank the quantized nodes of the step-1 model by the noise they add."""
    t = time.time()
    ranking = rank_nodes(fp32, start.path, calib_reader_factory(), max_batches=plan.analysis_batches)
    log(
        f"  int8 search: ranked {len(ranking)} quantized nodes by added quantization noise in "
        f"{time.time() - t:.0f} s; worst: " + ", ".join(f"{lab} ({db:.1f} dB)" for _, lab, db, _ in ranking[:3])
    )
    return _Ranking(
        ranking,
        {n: lab for n, lab, _, _ in ranking},
        [(n, lab, round(db, 2)) for n, lab, db, _ in ranking[:20]],
        max(1, int(len(ranking) * plan.max_float_fraction)) if ranking else 0,
    )


def _float_fallback(plan: _Plan, trials: _Trials, ranking: _Ranking, start: _Candidate) -> _Fallback:
    """Step 2b: keep the k worst nodes in float, k = 1, 2, 4 ... until the drop is within the gate."""
    current = start.setting
    tried: dict[int, _Candidate] = {0: start}
    k, prev_k, passing, failing, reselected = 1, 0, None, 0, False
    while k <= ranking.limit and len(tried) - 1 < plan.max_trials:
        d, p = trials.run("float-fallback", *current, ranking.excluded_for(k), f"mixed_{k}")
        cand = _Candidate(d, p, current)
        if d > plan.max_drop and not reselected and d < 0.5 * tried[prev_k].drop:
            reselected = True
            cand = _reselect(plan, trials, ranking, k, cand)
            current = cand.setting
        tried[k] = cand
        if cand.drop <= plan.max_drop:
            passing = k
            break
        failing, prev_k = k, k
        k = min(ranking.limit, k * 2) if k < ranking.limit else ranking.limit + 1
    return _Fallback(tried, passing, failing)


def _reselect(plan: _Plan, trials: _Trials, ranking: _Ranking, k: int, cand: _Candidate) -> _Candidate:
    """Re-try the other calibration settings with the k worst nodes in float; the best candidate.

    Keeping these nodes in float changed the picture (e.g. an outlier path is gone): the
    calibration setting that was least bad with everything quantized may not be best now.
    """
    tried_here = cand.setting
    for m, pc in plan.settings:
        if (m, pc) == tried_here:
            continue
        d2, p2 = trials.run("re-select setting", m, pc, ranking.excluded_for(k), f"mixed_{k}_{m}_{int(pc)}")
        if d2 < cand.drop:
            cand = _Candidate(d2, p2, (m, pc))
        if cand.drop <= plan.max_drop:
            break
    return cand


def _smallest_passing(plan: _Plan, trials: _Trials, ranking: _Ranking, fallback: _Fallback) -> int:
    """Step 2c: bisect for the smallest passing k (adding to ``fallback.tried``); the least bad k if none passed."""
    tried = fallback.tried
    if fallback.passing is None:
        return min(tried, key=lambda kk: tried[kk].drop)
    current = tried[fallback.passing].setting
    lo, hi = fallback.failing, fallback.passing  # lo fails, hi passes
    while hi - lo > 1 and len(tried) - 1 < plan.max_trials:
        mid = (lo + hi) // 2
        d, p = trials.run("float-fallback", *current, ranking.excluded_for(mid), f"mixed_{mid}")
        tried[mid] = _Candidate(d, p, current)
        if d <= plan.max_drop:
            hi = mid
        else:
            lo = mid
    return hi


def _result(plan: _Plan, trials: _Trials, ranking: _Ranking, k_best: int, best: _Candidate, out: Path) -> SearchResult:
    """Write the chosen model to ``out``, record the outcome and return it."""
    drop, (method, per_channel) = best.drop, best.setting
    shutil.copyfile(best.path, out)
    excluded = ranking.excluded_for(k_best)
    excluded_labels = [ranking.labels.get(n, n) for n in excluded]
    trials.records.append(
        {
            "stage": "result",
            "method": method,
            "per_channel": per_channel,
            "float_nodes": len(excluded),
            "float_node_labels": excluded_labels,
            "drop": round(drop, 3),
            "passed": drop <= plan.max_drop,
            "ranking_top10": [list(r) for r in ranking.top[:10]],
        }
    )
    baseline = trials.baseline
    return SearchResult(
        out,
        method,
        per_channel,
        excluded,
        drop,
        trials.records,
        baseline - drop / 100,
        baseline,
        drop <= plan.max_drop,
        excluded_labels,
        ranking.top,
    )


_ORDER = ("entropy", "percentile", "minmax")


@contextlib.contextmanager
def entropy_bins(num_bins: int = 2048, num_quantized_bins: int = 128):
    """Give ONNX Runtime's entropy calibrator a real threshold search (2048 bins, as TensorRT / PyTorch).

    ``quantize_static`` does not forward ``num_bins``, and the calibrator's default of
    128 bins for 128 quantized bins leaves one candidate threshold, the full range: ORT's
    "entropy" is then exactly min-max (same scales, measured; onnxruntime issue #9597,
    PR #10261). Inside this context the bins are injected where ``quantize_static``
    creates its calibrator. The search uses it for its ``entropy`` setting.
    """
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not the function
    create = getattr(ort_quantize, "create_calibrator", None)
    if create is None:  # pragma: no cover - a future ORT that moved it: leave ORT's behaviour
        yield
        return

    def create_with_bins(*args, **kwargs):
        opts = dict(kwargs.get("extra_options") or {})
        opts.setdefault("num_bins", num_bins)
        opts.setdefault("num_quantized_bins", num_quantized_bins)
        kwargs["extra_options"] = opts
        return create(*args, **kwargs)

    ort_quantize.create_calibrator = create_with_bins
    try:
        yield
    finally:
        ort_quantize.create_calibrator = create


def _float_tensors(model) -> set[str]:
    """Names of float tensors produced by nodes (after shape inference)."""
    from onnx import TensorProto

    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.output)}
    return {o for n in model.graph.node for o in n.output if types.get(o) == TensorProto.FLOAT}


Q = "q::"


def local_error_model(fmodel, qmodel):
    """One graph holding the FP32 model and a copy of the QDQ model fed from FP32 activations.

    Every QuantizeLinear of the QDQ copy (prefixed ``q::``) reads the FP32 model's
    tensor, and every quantized node's other activation inputs are FP32 too, so each
    quantized node computes ``node(DQ(Q(fp32 inputs)), DQ(Q(weights)))``: its *local*
    quantization error, free of the error piling up upstream (which would otherwise
    hide every node after the first one that breaks).

    Returns:
        ``(model, pairs)``: the merged model and ``{node name: [(fp32 output, q:: output), ...]}``
        for the quantized nodes.
    """
    import onnx
    from onnx import TensorProto, helper

    fnodes = {n.name: n for n in fmodel.graph.node}
    ftensors = {o for n in fmodel.graph.node for o in n.output} | {i.name for i in fmodel.graph.input}
    finits = {i.name for i in fmodel.graph.initializer}
    qprod = {o: n for n in qmodel.graph.node for o in n.output}
    qinits = {i.name for i in qmodel.graph.initializer}
    qgraph_inputs = {i.name for i in qmodel.graph.input}
    quantized = {
        n.name
        for n in qmodel.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and n.name in fnodes
        and any(i in qprod and qprod[i].op_type == "DequantizeLinear" for i in n.input)
    }

    def rename(name: str) -> str:
        if not name:
            return name
        return name if name in qgraph_inputs and name in ftensors else Q + name

    merged = onnx.ModelProto()
    merged.CopyFrom(fmodel)
    g = merged.graph
    for init in qmodel.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = Q + init.name
        g.initializer.append(t)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for n in qmodel.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = Q + n.name
        ins = []
        for i in n.input:
            from_fp32 = (
                i in ftensors
                and i not in qinits
                and i not in finits
                and (
                    n.op_type == "QuantizeLinear"
                    or (n.name in quantized and not (i in qprod and qprod[i].op_type == "DequantizeLinear"))
                )
            )
            ins.append(i if from_fp32 else rename(i))
        m.ClearField("input")
        m.input.extend(ins)
        m.ClearField("output")
        m.output.extend(rename(o) for o in n.output)
        g.node.append(m)
        if n.name in quantized:
            f = fnodes[n.name]
            pairs[n.name] = [(fo, rename(qo)) for fo, qo in zip(f.output, n.output)]
    have = {o.name for o in g.output}
    floats = _float_tensors(fmodel) | {o.name for o in fmodel.graph.output}
    for node, outs in list(pairs.items()):
        outs = [(fo, qo) for fo, qo in outs if fo in floats]
        if not outs:
            del pairs[node]
            continue
        pairs[node] = outs
        for fo, qo in outs:
            for name in (fo, qo):
                if name not in have:
                    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                    have.add(name)
    domains = {o.domain: o.version for o in merged.opset_import}
    for o in qmodel.opset_import:
        if o.domain not in domains:
            merged.opset_import.append(o)
    return merged, pairs


def node_labels(model) -> dict[str, str]:
    """Readable labels: the layer name from a node's weight (``features.2.0.block.0.0``), else op after nearest layer."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    labels: dict[str, str] = {}

    def own(n) -> str | None:
        for i in n.input[1:]:
            if i in inits and i.endswith(".weight"):
                return i[: -len(".weight")]
        return None

    for n in model.graph.node:
        lab = own(n)
        if lab is None:
            seen, frontier, near = set(), [n], None
            while frontier and near is None and len(seen) < 50:
                cur = frontier.pop(0)
                for i in cur.input:
                    p = producer.get(i)
                    if p is not None and p.name not in seen:
                        seen.add(p.name)
                        near = own(p)
                        if near:
                            break
                        frontier.append(p)
            lab = f"{n.op_type} after {near}" if near else f"{n.op_type} {n.name}"
        labels[n.name] = f"{lab} ({n.op_type})" if own(n) else lab
    return labels


def rank_nodes(
    fp32_onnx: str | Path,
    qdq_onnx: str | Path,
    reader,
    max_batches: int = 4,
    chunk: int | None = None,
    memory_mb: int = 512,
) -> list[tuple[str, str, float, list[str]]]:
    """Rank the QDQ model's quantized nodes by their local quantization error.

    ``local_error_model`` runs each quantized node on quantized copies of the *FP32*
    activations (unoptimised ONNX Runtime CPU, so the QDQ arithmetic is simulated
    exactly); the error of its output against FP32 is the noise that quantizing this
    node's inputs and weights causes. It is measured per channel and averaged over
    channels (``channel_nsr``): an outlier channel holds most of a tensor's energy, so a
    per-tensor ratio looks fine while every other channel is crushed to a few levels.

    ONNX Runtime's QDQ quantizer puts a Q/DQ pair on a tensor when its producer *or* a
    consumer is quantized, so keeping a node's computation in float means excluding the
    node *and* the producers of its activation inputs: that set is returned per node.

    Args:
        fp32_onnx: FP32 model (pre-processed inside, as ``quantize_int8`` does).
        qdq_onnx: Its QDQ quantization.
        reader: A ``CalibrationDataReader`` of inputs.
        max_batches: Reader batches to use.
        chunk: Images per run; default: as many as keep one run's outputs (every node's output,
            FP32 and quantized) under ``memory_mb``, between 1 and 16.
        memory_mb: Memory budget for one run's outputs when ``chunk`` is not given.

    Returns:
        ``[(node name, label, SQNR dB of its local error, nodes to exclude), ...]``, worst first.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
        fmodel = onnx.load(str(pre))
    qmodel = onnx.load(str(qdq_onnx))
    merged, pairs = local_error_model(fmodel, qmodel)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(merged.SerializeToString(), so, providers=["CPUExecutionProvider"])
    order = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0].name
    if chunk is None:
        chunk = max(1, min(16, int(memory_mb * 2**20 // max(_bytes_per_image(fmodel, pairs), 1))))
    sig: dict[str, np.ndarray] = {}
    err: dict[str, np.ndarray] = {}
    for _ in range(max_batches):
        feed = reader.get_next()
        if feed is None:
            break
        x = next(iter(feed.values()))
        for s in range(0, len(x), chunk):
            outs = dict(zip(order, sess.run(None, {inp: x[s : s + chunk]})))
            for node, node_pairs in pairs.items():
                for fo, qo in node_pairs:
                    a = outs[fo].astype(np.float64)
                    axes = tuple(i for i in range(a.ndim) if i != 1) if a.ndim >= 2 else None
                    sa = np.square(a).sum(axis=axes)
                    se = np.square(a - outs[qo]).sum(axis=axes)
                    key = f"{node}\0{fo}"
                    sig[key] = sa if key not in sig else sig[key] + sa
                    err[key] = se if key not in err else err[key] + se
    inits = {i.name for i in fmodel.graph.initializer}
    producer = {o: n for n in fmodel.graph.node for o in n.output}
    labels = node_labels(fmodel)
    scored = []
    for n in fmodel.graph.node:
        if n.name not in pairs:
            continue
        nsr = max(
            channel_nsr(sig[f"{n.name}\0{fo}"], err[f"{n.name}\0{fo}"])
            for fo, _ in pairs[n.name]
            if f"{n.name}\0{fo}" in sig
        )
        ins = [i for i in n.input if i and i not in inits]
        group = [n.name] + [producer[i].name for i in ins if i in producer and producer[i].name in pairs]
        scored.append((n.name, labels.get(n.name, n.name), _db(1.0, nsr), list(dict.fromkeys(group))))
    scored.sort(key=lambda t: t[2])  # lowest SQNR first = most damaged
    return scored


def _bytes_per_image(fmodel, pairs: dict[str, list[tuple[str, str]]]) -> int:
    """Bytes of the FP32 + quantized node outputs ``rank_nodes`` fetches for one image (unknown dims: 256 KiB)."""
    shapes = {}
    for vi in list(fmodel.graph.value_info) + list(fmodel.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    total = 0
    for node_pairs in pairs.values():
        for fo, _ in node_pairs:
            dims = shapes.get(fo)
            per = int(np.prod(dims[1:])) * 4 if dims and len(dims) > 1 and all(dims[1:]) else 1 << 18
            total += 2 * per
    return total


def channel_nsr(signal: np.ndarray, noise: np.ndarray) -> float:
    """Mean over channels of the noise-to-signal ratio, each capped at 1 (a destroyed channel).

    Per channel, not per tensor: an outlier channel holds most of a tensor's energy, so
    a per-tensor ratio looks fine while every other channel is crushed to a few levels.
    Near-silent channels (below 1e-6 of the mean channel energy) are left out.
    """
    signal, noise = np.atleast_1d(signal), np.atleast_1d(noise)
    live = signal > 1e-6 * max(float(signal.mean()), 1e-30)
    if not live.any():
        return 0.0 if float(noise.sum()) == 0 else 1.0
    return float(np.minimum(noise[live] / signal[live], 1.0).mean())


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return SQNR_CAP_DB
    if signal <= 0:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10 * math.log10(signal / noise)))


def throughput(
    onnx_path: str | Path, shape: Sequence[int], seconds: float = 5.0, threads: int = 1, warmup: int = 1
) -> float:
    """ONNX Runtime CPU crops/s on random input of ``shape`` (N x C x H x W), timed for about ``seconds``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 1, tuple(shape)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    n, t0 = 0, time.perf_counter()
    while True:
        sess.run(None, {name: x})
        n += 1
        if time.perf_counter() - t0 >= seconds:
            break
    return n * shape[0] / (time.perf_counter() - t0)


def speed_table(
    models: dict[str, str | Path], shape: Sequence[int], repeats: int = 5, threads: int = 1
) -> dict[str, dict[str, float]]:
    """Crops/s of several ONNX models on the same random batch, runs interleaved (ORT CPU).

    For the speed cost of mixed precision: ``{"fp32": ..., "int8": ..., "mixed": ...}``.
    Reports the median over ``repeats`` by wall clock and by this process's CPU time
    (steadier on a shared machine).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in models.items()}
    x = np.random.default_rng(0).normal(0, 1, tuple(shape)).astype(np.float32)
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(repeats):
        for k, s in sessions.items():
            t, c = time.perf_counter(), time.process_time()
            s.run(None, {s.get_inputs()[0].name: x})
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    n = shape[0]
    return {
        k: {
            "crops_per_s": round(n / float(np.median(wall[k])), 2),
            "crops_per_cpu_s": round(n / float(np.median(cpu[k])), 2),
        }
        for k in sessions
    }
