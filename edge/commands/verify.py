"""``hemaedge verify BUNDLE``: run the bundle's golden inputs here and compare with the workstation.

The backend is the one ``hemaedge count`` would choose (same threads; on a CPU, measured), or the one
``--backend`` names (``openvino``, ``ort-cpu``...); ``--all`` checks every CPU backend and precision
this station has (ONNX Runtime, OpenVINO), each against the golden outputs of the model file it runs.

Exit status: 0 when the backend(s) agree with the workstation within the
thresholds, 1 when one does not, 2 for errors (no golden outputs, bad options).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from hemaedge.edge.classify.select import PRECISIONS, PREFERENCES


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge verify``."""
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("--backend", default="auto", help=f"one of {', '.join(PREFERENCES)} (default auto: the best here)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="precision to run (default auto)")
    p.add_argument("--min-agreement", type=float, help="pass threshold: top-1 agreement (default by precision)")
    p.add_argument("--max-diff", type=float, help="pass threshold: max |probability difference| (default by precision)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument(
        "--all", action="store_true", help="check every CPU backend and precision here (ONNX Runtime, OpenVINO)"
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")


def verify(
    bundle_path: str,
    backend: str = "auto",
    precision: str = "auto",
    min_agreement: float | None = None,
    max_diff: float | None = None,
    batch: int = 32,
) -> dict:
    """Run the golden inputs through the selected backend; the report as a dict."""
    from hemaedge.edge.bundle.golden import compare_golden, load_golden
    from hemaedge.edge.bundle.io import load_bundle
    from hemaedge.edge.classify.select import select_backend
    from hemaedge.edge.station import DEFAULT_THREADS

    bundle = load_bundle(bundle_path)
    golden = load_golden(bundle)
    chosen, reason = select_backend(bundle, backend, precision, threads=DEFAULT_THREADS)
    with chosen:
        probs = np.concatenate(
            [chosen.classify(golden.inputs[i : i + batch]) for i in range(0, len(golden.inputs), batch)]
        )
        art = getattr(chosen, "artifact", None)
        calibrated_here = bool(art is not None and art.details.get("mode") == "implicit-int8")
        report = compare_golden(
            golden,
            probs,
            getattr(chosen, "golden_key", chosen.precision),
            bundle.manifest.output_kind,
            station_calibrated=calibrated_here,
            min_agreement=min_agreement,
            max_diff=max_diff,
        )
        name = chosen.name
    return {
        "bundle": str(bundle.path),
        "backend": name,
        "precision": chosen.precision,
        "reason": reason,
        **report.to_dict(),
    }


def verify_all(bundle_path: str, precision: str = "auto") -> dict:
    """The golden check of every CPU backend x precision this station has (``--all``)."""
    from hemaedge.edge.bundle.golden import load_golden
    from hemaedge.edge.bundle.io import load_bundle
    from hemaedge.edge.classify.measure import golden_check
    from hemaedge.edge.classify.select import cpu_candidates
    from hemaedge.edge.errors import HemaedgeError

    bundle = load_bundle(bundle_path)
    golden = load_golden(bundle)
    candidates, runtimes, _ = cpu_candidates(bundle, precision)
    rows = []
    for c in candidates:
        row: dict = {"backend": c.key, "label": c.label, "precision": c.precision}
        if c.excluded:  # checked all the same, but the station never runs it (the bundle or this CPU says why)
            row["excluded"] = c.excluded
        try:
            with c.factory() as be:
                row.update(golden_check(be, golden, bundle.manifest.output_kind))
                row["model_file"] = be.model_path.name
                row["runs_as"] = be.name  # e.g. ONNX Runtime's INT8 at the basic graph level on some CPUs
        except HemaedgeError as exc:
            row.update(passed=False, error=str(exc))
        rows.append(row)
    used = [r for r in rows if not r.get("excluded")]
    return {
        "bundle": str(bundle.path),
        "runtimes": runtimes,
        "backends": rows,
        "passed": bool(used) and all(r["passed"] for r in used),  # what the station may run
    }


def _run_all(args: argparse.Namespace) -> int:
    r = verify_all(args.bundle, args.precision)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["passed"] else 1
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(
        title=f"golden check of every CPU backend here ({', '.join(f'{k} {v}' for k, v in r['runtimes'].items())})"
    )
    for col in ("backend", "precision", "model file", "vs", "top-1 agreement", "max |Δp|", "top-1 vs fp32", ""):
        t.add_column(col)
    notes: list[str] = []
    for b in r["backends"]:
        name = f"{b['label']} {b['precision']}"
        if "(" in b.get("runs_as", ""):
            notes.append(f"{name} runs as {b['runs_as']}")
        if b.get("excluded"):
            notes.append(f"{name} is not used by the station here: {b['excluded']}")
        if "error" in b:
            t.add_row(b["label"], b["precision"], "", "", "", "", "", f"[red]not usable: {b['error']}[/]")
            continue
        status = "[green]PASS[/]" if b["passed"] else "[bold red]FAIL[/]"
        t.add_row(
            b["label"],
            b["precision"],
            b["model_file"],
            b["reference"],
            f"{b['top1_agreement']:.1%}",
            f"{b['max_abs_diff']:.4f}",
            "" if b["top1_vs_fp32"] is None else f"{b['top1_vs_fp32']:.1%}",
            status + (" [yellow](not used)[/]" if b.get("excluded") else ""),
        )
    con.print(t)
    for line in notes:
        con.print(f"* {line}", highlight=False, markup=False)
    return 0 if r["passed"] else 1


def run(args: argparse.Namespace) -> int:
    """Verify and print the result; exit 1 when it fails."""
    if _is_detector(args.bundle):
        return _verify_detector(args)
    if args.all:
        if args.backend != "auto":
            from hemaedge.edge.errors import UsageError

            raise UsageError("--all checks every CPU backend; drop --backend")
        return _run_all(args)
    r = verify(args.bundle, args.backend, args.precision, args.min_agreement, args.max_diff, args.batch)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["passed"] else 1
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[dim]{r['reason']}[/]")
    t = Table(title=f"golden check: {r['samples']} inputs on {r['backend']} vs the workstation's {r['reference']}")
    t.add_column("reference")
    t.add_column("top-1 agreement", justify="right")
    t.add_column("max |Δp|", justify="right")
    t.add_column("mean |Δp|", justify="right")
    t.add_row(
        f"{r['reference']} (checked)",
        f"{r['top1_agreement']:.1%}",
        f"{r['max_abs_diff']:.4f}",
        f"{r['mean_abs_diff']:.5f}",
    )
    for name, s in r["others"].items():
        t.add_row(
            f"[dim]{name}[/]",
            f"[dim]{s['top1_agreement']:.1%}[/]",
            f"[dim]{s['max_abs_diff']:.4f}[/]",
            f"[dim]{s['mean_abs_diff']:.5f}[/]",
        )
    con.print(t)
    limits = f"needs agreement >= {r['min_agreement']:.0%} and max |Δp| <= {r['max_diff']}"
    if r["passed"]:
        con.print(f"[bold green]PASS[/] this station computes what the workstation computed ({limits})")
        return 0
    con.print(
        f"[bold red]FAIL[/] outputs differ from the workstation's ({limits}); check the backend, "
        "rebuild the engine (hemaedge build-engine) or re-export the bundle"
    )
    return 1


def _is_detector(path: str) -> bool:
    from hemaedge.edge.bundle.io import read_manifest

    return read_manifest(path).extra.get("task") == "detect"


def _verify_detector(args: argparse.Namespace) -> int:
    """A detector bundle: heatmaps and boxes of its golden inputs against the workstation's."""
    from hemaedge.edge.segment.learned import verify_detector

    if args.backend not in ("auto", "ort-cpu", "onnxruntime"):
        from hemaedge.edge.errors import UsageError

        raise UsageError("a detector bundle runs on ONNX Runtime's CPU provider here (--backend auto)")
    r = verify_detector(args.bundle, args.precision if args.precision != "fp16" else "auto")
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        from rich.console import Console

        word = "[bold green]PASS[/]" if r["passed"] else "[bold red]FAIL[/]"
        Console().print(
            f"{word} detector {r['model_file']} ({r['precision']}) vs the workstation's {r['reference']} on "
            f"{r['samples']} golden inputs: heatmap max |diff| {r['heatmap_max_abs_diff']:.4f} (<= {r['max_diff']}), "
            f"boxes found again {r['box_agreement']:.1%} of {r['boxes']} (>= {r['min_agreement']:.0%})",
            highlight=False,
        )
    return 0 if r["passed"] else 1
