"""Checkpoints: a state dict plus everything needed to rebuild and export the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hemaedge.edge.errors import InputError

FORMAT = "hemaedge-checkpoint"


def save(path: str | Path, **fields: Any) -> None:
    """Write a checkpoint atomically (``arch``, ``arch_kwargs``, ``state_dict``, ``classes``, ``input`` ...)."""
    import torch

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **fields}, tmp)
    tmp.replace(path)


def load(path: str | Path) -> dict[str, Any]:
    """Read a hemaedge checkpoint (or a bare torchvision-style state dict with ``arch`` given later).

    Raises:
        InputError: when the file is missing or not a checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]})") from exc
    if isinstance(ck, dict) and ck.get("format") == FORMAT:
        return ck
    if isinstance(ck, dict) and all(hasattr(v, "shape") for v in ck.values()):
        return {"format": "state_dict", "state_dict": ck}
    raise InputError(f"{path} is neither a hemaedge checkpoint nor a state dict")


def build_model(ck: dict[str, Any]):
    """Instantiate the checkpoint's architecture and load its weights (eval mode)."""
    from hemaedge.export.models import build

    model = build(ck["arch"], len(ck["classes"]), **ck.get("arch_kwargs", {}))
    model.load_state_dict(ck["state_dict"])
    return model.eval()
