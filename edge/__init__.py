"""hemaedge station runtime: camera frames -> white cells -> differential count.

Nothing in this package imports torch, ``export`` or ``calibration``
(``tests/test_layering.py`` enforces it), so a station installs without them.
"""

__version__ = "0.1.0"
