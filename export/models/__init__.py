"""Registered architectures: ``build(name, num_classes, **kw) -> torch.nn.Module``.

A checkpoint records its architecture name and keyword arguments, so
``export-model`` and ``hemaedge train`` rebuild the same module. Each module
here registers itself with ``@register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hemaedge.edge.errors import UsageError

_REGISTRY: dict[str, Callable[..., Any]] = {}
# Defaults each architecture was trained with: input size and normalisation.
DEFAULTS: dict[str, dict[str, Any]] = {}


def register(name: str, **defaults: Any) -> Callable:
    """Class/function decorator adding a model factory to the registry."""

    def deco(factory: Callable) -> Callable:
        _REGISTRY[name] = factory
        DEFAULTS[name] = defaults
        return factory

    return deco


def _load_all() -> None:
    from hemaedge.export.models import bloodcnn5, hemanet  # noqa: F401

    try:
        from hemaedge.export.models import efficientnet  # noqa: F401
    except ImportError:
        pass


def names() -> list[str]:
    """Registered architecture names."""
    _load_all()
    return sorted(_REGISTRY)


def build(name: str, num_classes: int, **kwargs: Any):
    """Instantiate a registered architecture.

    Raises:
        UsageError: for an unknown name, listing the known ones.
    """
    _load_all()
    if name not in _REGISTRY:
        raise UsageError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)
