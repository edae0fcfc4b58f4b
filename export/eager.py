"""The PyTorch eager FP32 baseline of ``hemaedge bench``, run in a child process.

``python -m hemaedge.export.eager --bundle B --crops X.npy`` rebuilds the model the bundle was exported from
(its checkpoint, checked against the bundle's provenance sha256), times it on the preprocessed crops in
``X.npy`` exactly as the bench times the runtimes, and prints ``{"median", "min", "max", "runs"}`` crops/s.
It lives on the workstation side because it needs torch; the station's bench calls it across a process
boundary so the runtime never imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from hemaedge.edge.errors import HemaedgeError, UsageError


def eager_rate(bundle_dir: str, crops: np.ndarray, repeats: int, threads: int, checkpoint: str | None = None) -> dict:
    """Median/min/max crops per second of the bundle's source checkpoint in PyTorch eager FP32."""
    import torch
    from hemaedge.edge.bundle import load_bundle, sha256_file
    from hemaedge.export import checkpoint as ckpt_mod

    bundle = load_bundle(bundle_dir)
    path = (
        Path(checkpoint)
        if checkpoint
        else Path(ckpt_mod.__file__).parent / "checkpoints" / f"{bundle.manifest.name}.pt"
    )
    if not path.is_file():
        raise UsageError(f"no PyTorch checkpoint for the eager baseline at {path}: pass --checkpoint or --skip-torch")
    want = (bundle.manifest.provenance.get("source_model") or {}).get("sha256")
    if want and sha256_file(path) != want:
        raise UsageError(f"{path} is not the model this bundle was exported from (sha256 differs)")
    if threads:
        torch.set_num_threads(threads)
    model = ckpt_mod.build_model(ckpt_mod.load(path))
    xt = torch.from_numpy(crops)

    def once() -> None:
        with torch.no_grad():
            torch.softmax(model(xt), 1)

    once()  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        rates.append(len(crops) / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hemaedge.export.eager", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--crops", required=True, help=".npy of preprocessed N x C x H x W float32 crops")
    ap.add_argument("--checkpoint")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        print(json.dumps(eager_rate(a.bundle, np.load(a.crops), a.repeats, a.threads, a.checkpoint)))
    except HemaedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
