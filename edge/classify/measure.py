"""Choice by measurement: the fastest CPU backend for a bundle on this station that computes what the workstation did.

No single CPU runtime wins everywhere (ONNX Runtime runs the 28-px CNN's asymmetric INT8 model
fastest; OpenVINO runs EfficientNet's INT8, which ONNX Runtime leaves half in float, 4-5x faster),
so ``--backend auto`` on a CPU station measures. Each candidate (runtime x precision this
station has) is loaded, checked against the bundle's golden outputs (``edge/bundle/golden.py``),
and timed on the golden inputs; the fastest that passes wins. A candidate that fails the golden
check is never chosen, however fast.

The result is cached per bundle and station, in a per-user cache directory (never inside the
bundle, which may be read-only): ``$HEMAEDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hemaedge``, else
``~/.cache/hemaedge``, file ``backend-measurements.json``. The key is the bundle manifest's
sha256 (which lists every model file's sha256), the runtimes' names and versions, hemaedge's version and
the version of the measuring method (``METHOD``), the CPU model, its core count, the threads and the measuring
batch: a changed bundle, runtime, hemaedge, machine or thread count is measured again. Stored per candidate:
crops/s (median, min, max of a few rounds), the golden check (reference, top-1 agreement, max |Δp|, passed) or
why it could not load, and the load average while measuring (a measurement taken on a busy machine says so). A
corrupt, unreadable or unwritable cache file is never an error: the station measures again (and says the result
was not cached).

Timing runs in interleaved rounds (each candidate in turn, a few times), so a neighbour's load
spreads over all candidates instead of falling on one; the whole measurement takes a few seconds
(most of it loading the models).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hemaedge.edge import __version__
from hemaedge.edge.bundle.io import Bundle, sha256_file
from hemaedge.edge.errors import BackendError, BundleError, HemaedgeError

CACHE_ENV = "HEMAEDGE_CACHE_DIR"
CACHE_NAME = "backend-measurements.json"
SCHEMA = 1  # the cache file's layout
# How a candidate is loaded, checked and timed. Part of every station key: bump it whenever that changes, so a station
# that upgrades hemaedge measures again instead of keeping a choice the old code made. 2: ONNX Runtime's INT8 sessions
# choose their graph level against the golden outputs (``cpu_session``); under 1 they failed the golden check on CPUs
# without VNNI, and that failure stayed cached.
METHOD = 2
MAX_ENTRIES = 64  # bundles x stations x thread counts remembered; the oldest go first
MEASURE_BATCH = 8  # the station classifies one frame's new cells per call: a few crops, not hundreds
ROUNDS = 5
ROUND_BUDGET_S = 0.06  # per candidate and round (at least one call)


def cache_dir() -> Path:
    """The per-user cache directory of hemaedge (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if sys.platform == "win32" else None)
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "hemaedge"


def cpu_name() -> str:
    """The CPU model, as the OS names it (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Candidate:
    """A backend this station could run a bundle on.

    Attributes:
        key: Short stable id, e.g. ``openvino/int8`` (the cache and the reports use it).
        label: For people, e.g. ``OpenVINO CPU``.
        precision: ``int8`` or ``fp32``.
        factory: Makes a fresh backend, not entered.
        excluded: Why it may not be chosen whatever it measures (e.g. it missed the INT8 gate at export).
    """

    key: str
    label: str
    precision: str
    factory: Callable[[], Any]
    excluded: str = ""


@dataclass
class Measurement:
    """What one candidate measured here."""

    key: str
    label: str
    precision: str
    crops_per_s: float | None = None
    min: float | None = None
    max: float | None = None
    golden: dict[str, Any] | None = None  # None: the bundle has no golden outputs
    error: str = ""
    excluded: str = ""
    model_file: str = ""

    @property
    def passed(self) -> bool:
        """Loaded, ran, and reproduced the golden outputs (or the bundle has none to check)."""
        return not self.error and (self.golden is None or bool(self.golden.get("passed")))

    @property
    def eligible(self) -> bool:
        """May be chosen."""
        return self.passed and not self.excluded and bool(self.crops_per_s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        """From the cache (raises KeyError/TypeError on a malformed entry)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------------------------------
def station_key(bundle: Bundle, runtimes: dict[str, str], threads: int, batch: int = MEASURE_BATCH) -> dict[str, Any]:
    """What a measurement depends on (see the module docstring)."""
    try:
        manifest_sha = sha256_file(bundle.path / "manifest.json")
    except OSError as exc:  # pragma: no cover - load_bundle just read it
        raise BundleError(f"cannot read {bundle.path / 'manifest.json'}: {exc}") from exc
    return {
        "schema": SCHEMA,
        "method": METHOD,
        "hemaedge": __version__,
        "bundle": bundle.manifest.name,
        "manifest_sha256": manifest_sha,
        "runtimes": dict(sorted(runtimes.items())),
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cores": os.cpu_count() or 0,
        "threads": int(threads),
        "batch": int(batch),
    }


def key_id(key: dict[str, Any]) -> str:
    """A short digest of a station key (the cache's index)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class MeasurementCache:
    """The per-user measurement cache. Never raises: a bad file reads as empty, a failed write is reported.

    Attributes:
        path: The JSON file.
        problem: The last read or write problem, ``""`` when none (for the reason line).
    """

    path: Path = field(default_factory=lambda: cache_dir() / CACHE_NAME)
    problem: str = ""

    def _read_all(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # unreadable or not JSON: measure again, overwrite it
            self.problem = f"cache {self.path} unreadable ({type(exc).__name__})"
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), dict):
            self.problem = f"cache {self.path} has an unknown layout"
            return {}
        return doc["entries"]

    def load(self, key: dict[str, Any]) -> tuple[dict[str, Measurement], dict[str, Any]]:
        """The measurements stored for a station key, and when and under what load they were taken."""
        entry = self._read_all().get(key_id(key))
        if not isinstance(entry, dict) or entry.get("key") != key:
            return {}, {}
        out = {}
        for k, d in (entry.get("results") or {}).items():
            try:
                out[k] = Measurement.from_dict(d)
            except (TypeError, KeyError, AttributeError):
                continue  # a malformed entry is measured again
        meta = {"measured": str(entry.get("measured", "")), "load": entry.get("load")}
        return out, meta

    def store(self, key: dict[str, Any], results: dict[str, Measurement], load: float | None = None) -> bool:
        """Merge measurements for a station key into the file (atomically). False when it could not be written."""
        entries = self._read_all()
        entries.pop(key_id(key), None)
        entries[key_id(key)] = {
            "key": key,
            "measured": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load": load,
            "results": {k: m.to_dict() for k, m in results.items()},
        }
        while len(entries) > MAX_ENTRIES:  # dicts keep insertion order: the first is the oldest
            entries.pop(next(iter(entries)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".measure-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"schema": SCHEMA, "entries": entries}, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            self.problem = f"not cached: cannot write {self.path} ({exc.strerror or type(exc).__name__})"
            return False
        return True


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, HemaedgeError) else text


def _timing_batch(bundle: Bundle, golden: Any, batch: int) -> np.ndarray:
    if golden is not None:
        return np.ascontiguousarray(np.resize(golden.inputs, (batch, *golden.inputs.shape[1:])), dtype=np.float32)
    spec = bundle.manifest.input
    return np.random.default_rng(0).normal(0, 1, (batch, spec.channels, spec.height, spec.width)).astype(np.float32)


def warm_up(backend: Any, x: np.ndarray) -> None:
    """Run a batch a few times before timing (allocations, kernel choice), and let a backend that prepares
    itself for a batch size it keeps seeing (OpenVINO's static-shape models) finish doing so."""
    for _ in range(2):
        backend.classify(x)
    settle = getattr(backend, "settle", None)
    if settle is not None:
        settle()
    backend.classify(x)


def golden_check(backend: Any, golden: Any, output_kind: str, batch: int = 32) -> dict[str, Any]:
    """Run the golden inputs through an entered backend; the comparison as a small dict."""
    from hemaedge.edge.bundle.golden import compare_golden

    probs = np.concatenate(
        [backend.classify(golden.inputs[i : i + batch]) for i in range(0, len(golden.inputs), batch)]
    )
    rep = compare_golden(golden, probs, getattr(backend, "golden_key", backend.precision), output_kind)
    vs_fp32 = rep.top1_agreement if rep.reference == "fp32" else rep.others.get("fp32", {}).get("top1_agreement")
    return {
        "reference": rep.reference,
        "samples": rep.samples,
        "top1_agreement": rep.top1_agreement,
        "max_abs_diff": round(rep.max_abs_diff, 6),
        "passed": rep.passed,
        "top1_vs_fp32": vs_fp32,
    }


def measure(
    candidates: list[Candidate],
    bundle: Bundle,
    batch: int = MEASURE_BATCH,
    rounds: int = ROUNDS,
    budget_s: float = ROUND_BUDGET_S,
) -> dict[str, Measurement]:
    """Load, golden-check and time each candidate; failures are recorded, never raised."""
    from hemaedge.edge.bundle.golden import load_golden

    try:
        golden = load_golden(bundle)
    except BundleError:
        golden = None
    x = _timing_batch(bundle, golden, batch)
    out: dict[str, Measurement] = {}
    live: list[tuple[Measurement, Any]] = []
    with ExitStack() as stack:
        for c in candidates:
            m = Measurement(c.key, c.label, c.precision, excluded=c.excluded)
            out[c.key] = m
            try:
                be = stack.enter_context(c.factory())
                m.model_file = Path(str(getattr(be, "model_path", ""))).name
                if golden is not None:
                    m.golden = golden_check(be, golden, bundle.manifest.output_kind)
                warm_up(be, x)
            except Exception as exc:  # noqa: BLE001 - any runtime failure excludes the candidate, with the reason
                m.error = _one_line(exc)
                continue
            live.append((m, be))
        rates: dict[str, list[float]] = {m.key: [] for m, _ in live}
        for _ in range(max(1, rounds)):
            for m, be in live:
                if m.error:
                    continue
                n, t0 = 0, time.perf_counter()
                try:
                    while True:
                        be.classify(x)
                        n += 1
                        elapsed = time.perf_counter() - t0
                        if elapsed >= budget_s:
                            break
                except Exception as exc:  # noqa: BLE001 - see above
                    m.error = _one_line(exc)
                    continue
                rates[m.key].append(n * len(x) / elapsed)
        for m, _ in live:
            r = rates[m.key]
            if r and not m.error:
                m.crops_per_s, m.min, m.max = round(statistics.median(r), 1), round(min(r), 1), round(max(r), 1)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# choosing
# ---------------------------------------------------------------------------------------------------------------------
def _short(m: Measurement) -> str:
    return f"{m.label} {m.precision}"


def summary(ms: list[Measurement]) -> str:
    """One clause per candidate: speeds, and who failed the golden check or could not load."""
    ran = sorted((m for m in ms if m.crops_per_s), key=lambda m: -(m.crops_per_s or 0))
    parts = []
    if ran:
        parts.append(", ".join(f"{_short(m)} {m.crops_per_s:.0f}" for m in ran) + " crops/s")
    failed = [m for m in ms if not m.error and m.golden is not None and not m.golden.get("passed")]
    if failed:
        parts.append(
            "failed the golden check: "
            + ", ".join(
                f"{_short(m)} (top-1 {m.golden['top1_agreement']:.2f}, max |Δp| {m.golden['max_abs_diff']:.3f})"
                for m in failed
                if m.golden
            )
        )
    broken = [m for m in ms if m.error]
    if broken:
        parts.append("not usable: " + ", ".join(f"{_short(m)} ({m.error})" for m in broken))
    excluded = [m for m in ms if m.excluded and not m.error]
    if excluded:
        parts.append("not eligible: " + ", ".join(f"{_short(m)} ({m.excluded})" for m in excluded))
    if ms and all(m.golden is None for m in ms if not m.error):
        parts.append("the bundle has no golden outputs, so none was checked against the workstation")
    elif ms and not failed:
        parts.append("all matched the golden outputs")
    return "; ".join(parts)


def pick(ms: list[Measurement]) -> Measurement | None:
    """The fastest eligible measurement, or None."""
    ok = [m for m in ms if m.eligible]
    return max(ok, key=lambda m: m.crops_per_s or 0.0) if ok else None


@dataclass
class Choice:
    """The outcome of :func:`choose`."""

    candidate: Candidate
    measurement: Measurement
    measurements: list[Measurement]
    reason: str
    cached: bool


def _threads_text(threads: int) -> str:
    return "default threads" if not threads else f"{threads} thread{'s' if threads != 1 else ''}"


def choose(
    candidates: list[Candidate],
    bundle: Bundle,
    runtimes: dict[str, str],
    threads: int = 0,
    *,
    cache: MeasurementCache | None = None,
    notify: Callable[[str], None] | None = None,
    measure_fn: Callable[..., dict[str, Measurement]] | None = None,
    batch: int = MEASURE_BATCH,
    remeasure: bool = False,
) -> Choice:
    """Measure (or recall) every candidate and return the fastest that passes the golden check.

    Args:
        candidates: What this station could run (see ``select.cpu_candidates``).
        bundle: The bundle.
        runtimes: Runtime name -> version (part of the cache key).
        threads: Inference threads (part of the cache key; 0 = the runtimes' defaults).
        cache: Where measurements are kept (default: the per-user cache).
        notify: Told, in one line, when a measurement starts (default: stderr).
        measure_fn: Replaces :func:`measure` (tests).
        batch: Crops per call while timing.
        remeasure: Ignore what is cached (and replace it).

    Raises:
        BackendError: No candidate loads, runs and reproduces the golden outputs.
    """
    if not candidates:
        raise BackendError("no CPU backend to measure (install onnxruntime, or 'hemaedge[openvino]')")
    cache = cache if cache is not None else MeasurementCache()
    key = station_key(bundle, runtimes, threads, batch)
    known, meta = cache.load(key) if not remeasure else ({}, {})
    missing = [c for c in candidates if c.key not in known]
    cached = not missing
    if missing:
        load = load_average()
        say = notify if notify is not None else _stderr
        say(
            f"measuring {len(missing)} backend{'s' if len(missing) != 1 else ''} for bundle "
            f"'{bundle.manifest.name}' on this station ({', '.join(c.key for c in missing)}; once, then cached "
            f"in {cache.path})..."
        )
        fresh = (measure_fn or measure)(missing, bundle, batch=batch)
        known.update(fresh)
        cache.store(key, known, load)
        meta = {"measured": "", "load": load}
    for c in candidates:  # exclusions come from the bundle as it is now, not from the cache
        known[c.key].excluded = c.excluded
    ms = [known[c.key] for c in candidates]
    best = pick(ms)
    when, load = meta.get("measured") or "", meta.get("load")
    cores = os.cpu_count() or 1
    where = (
        f"batch {batch}, {_threads_text(threads)}, "
        + (f"cached from {when[:16].replace('T', ' ')}" if cached and when else "measured just now")
        + (
            f"; the machine was busy then (load {load:.1f} on {cores} cores): remeasure when idle with "
            f"hemaedge doctor --bundle {bundle.path} --remeasure"
            if isinstance(load, (int, float)) and load > cores
            else ""
        )
        + (f"; {cache.problem}" if cache.problem else "")
    )
    if best is None:
        raise BackendError(
            f"no backend here reproduces bundle '{bundle.manifest.name}' ({where}): {summary(ms)}; "
            f"see: hemaedge verify {bundle.path} --backend BACKEND"
        )
    cand = next(c for c in candidates if c.key == best.key)
    of = f"the fastest of {len(ms)} measured here" if len(ms) > 1 else "the only one here, measured"
    reason = f"using {best.label} ({best.precision} ONNX), {of} ({where}): {summary(ms)}"
    return Choice(cand, best, ms, reason, cached)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): stored with a measurement, as a caveat."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _stderr(text: str) -> None:
    print(f"hemaedge: {text}", file=sys.stderr, flush=True)
