"""hemaedge: command-line entry points wiring the station runtime (``edge``) and the workstation (``export``)."""

from hemaedge.edge import __version__

__all__ = ["__version__"]
