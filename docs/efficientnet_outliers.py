"""Provoke an EfficientNet-B0 that quantizes badly, honestly: an FP32-identical outlier reparameterisation.

Used by docs/efficientnet.md to demonstrate ``export-model --int8 --search``.

At a junction where a linear layer feeds another linear layer with no residual
in between (an MBConv projection conv+BN feeding the next block's expand conv,
or the last projection feeding the head conv), multiply one output channel of
the first layer (BN gamma and beta) by ``scale`` and divide the second layer's
weights on that input channel by ``scale``. The FP32 function is unchanged
(checked), but INT8 activation scales are per tensor, so the other channels
of that tensor keep only about ``127 / scale`` levels each - the outlier-channel
pattern trained networks develop on their own (the reason LLM.int8 and
outlier-channel splitting exist).

    python docs/efficientnet_outliers.py runs/effb0_i128/best.pt runs/effb0_outlier/outlier.pt --scale 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hemaedge.export import checkpoint

# (BatchNorm after the first linear layer, conv reading it) in torchvision names (B0: no residual at either).
SITES = (
    ("features.1.0.block.2.1", "features.2.0.block.0.0"),  # stage-1 projection -> stage-2 expand conv
    ("features.7.0.block.3.1", "features.8.0"),  # last projection -> head conv
)


def provoke(
    state_dict: dict[str, torch.Tensor], scale: float, channel: int = 0, sites=SITES
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with one outlier channel per site (FP32 function unchanged)."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    for bn, conv in sites:
        sd[f"{bn}.weight"][channel] *= scale
        sd[f"{bn}.bias"][channel] *= scale
        sd[f"{conv}.weight"][:, channel] /= scale
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--scale", type=float, default=100.0)
    ap.add_argument("--channel", type=int, default=0)
    a = ap.parse_args()
    ck = checkpoint.load(a.src)
    model = checkpoint.build_model(ck)
    out = dict(ck)
    out.pop("format", None)
    out["state_dict"] = provoke(ck["state_dict"], a.scale, a.channel)
    out["provoked"] = {"sites": [list(s) for s in SITES], "scale": a.scale, "channel": a.channel, "source": str(a.src)}
    bad = checkpoint.build_model({**ck, "state_dict": out["state_dict"]})
    x = torch.randn(4, 3, ck["input"]["height"], ck["input"]["width"])
    with torch.no_grad():
        ref, got = model(x), bad(x)
    diff = float((ref - got).abs().max())
    print(f"FP32 max |logit diff| after reparameterisation: {diff:.2e} (logits up to {float(ref.abs().max()):.1f})")
    Path(a.dst).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(Path(a.dst), **out)


if __name__ == "__main__":
    main()
