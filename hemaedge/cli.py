"""``hemaedge`` and ``export-model``: a thin dispatcher.

Each subcommand lives in the package it belongs to and is imported only when
used, so ``hemaedge count`` runs on a station without torch. A command module
provides ``configure(parser)`` and ``run(args) -> int``. ``HemaedgeError``s
print as one red line and exit non-zero; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hemaedge.edge import __version__
from hemaedge.edge.errors import HemaedgeError, Terminated

# name -> (module, one-line help). Workstation commands need the 'export' extra.
COMMANDS: dict[str, tuple[str, str]] = {
    "count": ("hemaedge.edge.commands.count", "live differential count from a camera, video, images or --demo"),
    "detect": ("hemaedge.edge.commands.detect", "find white cells in images and print their boxes"),
    "collect": ("hemaedge.edge.commands.collect", "save the crops the station cuts (for INT8 calibration)"),
    "verify": ("hemaedge.edge.commands.verify", "run the bundle's golden inputs and compare with the workstation"),
    "doctor": ("hemaedge.edge.commands.doctor", "what this machine has and what is missing"),
    "build-engine": ("hemaedge.edge.commands.build_engine", "build a TensorRT engine for this GPU from a bundle"),
    "review": ("hemaedge.edge.commands.review", "review page: verify and reclassify cells, sign off (local web page)"),
    "export-cells": (
        "hemaedge.edge.commands.export_cells",
        "verified cells as DIR/<class>/*.png, for hemaedge adapt and export-model --calib",
    ),
    "fhir": (
        "hemaedge.edge.commands.fhir",
        "a session's results as a FHIR R4 Bundle; --post sends it (store-and-forward)",
    ),
    "evaluate": (
        "hemaedge.evaluation.command",
        "accuracy on labelled cells: the station's path (--station DATA) or the model alone (--data); "
        "white-cell detection on labelled frames (--detect DATA)",
    ),
    "train": ("hemaedge.export.commands.train", "train a registered architecture (workstation)"),
    "adapt": ("hemaedge.export.commands.adapt", "fit a bundle to this microscope from verified cells (workstation)"),
    "train-detector": (
        "hemaedge.export.commands.train_detector",
        "train the white-cell detector on TXL-PBC and BCCD (workstation)",
    ),
    "export": (
        "hemaedge.export.commands.export",
        "export a model to a checked ONNX / INT8 bundle (same as export-model)",
    ),
    "bench": ("hemaedge.edge.commands.bench", "throughput: ONNX Runtime FP32/INT8 vs PyTorch eager, whole pipeline"),
}


def _console():
    from rich.console import Console

    return Console(stderr=True)


_WORKSTATION_MODULES = ("torch", "onnx", "onnxslim", "onnxscript")


def _missing_extra(name: str, exc: ModuleNotFoundError) -> int | None:
    """One red line naming the extra when a workstation dependency is missing; None if it is something else."""
    if (exc.name or "").split(".")[0] not in _WORKSTATION_MODULES:
        return None
    # The station runtime runs on Python 3.8 (JetPack 5); the workstation extra needs >= 3.9 (torch 2.x).
    where = (
        "" if sys.version_info >= (3, 9) else f" on Python >= 3.9 (this is {sys.version_info[0]}.{sys.version_info[1]})"
    )
    _console().print(
        f"[bold red]error:[/] '{name}' needs the workstation extra ({exc.name} is missing): "
        f"pip install 'hemaedge\\[export]'{where}"
    )
    return 2


def _dispatch(name: str, argv: list[str], prog: str) -> int:
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=prog, description=help_text)
        module.configure(parser)
        args = parser.parse_args(argv)
        return int(module.run(args) or 0)
    except ModuleNotFoundError as exc:
        code = _missing_extra(name, exc)
        if code is None:
            raise
        return code
    except HemaedgeError as exc:
        _console().print(f"[bold red]error:[/] {_escape(str(exc))}")
        return exc.exit_code
    except Terminated:
        _console().print("[yellow]terminated[/]")
        return 143
    except KeyboardInterrupt:
        _console().print("[yellow]interrupted[/]")
        return 130


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text.splitlines()[0] if text else text)


def _quiet_opencv() -> None:
    """Keep OpenCV's and FFmpeg's own log lines (``[ WARN:0@...]``) off the terminal: hemaedge reports what went
    wrong in its own words (set before cv2 is first imported; a user's explicit setting wins)."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hemaedge``."""
    _quiet_opencv()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(n) for n in COMMANDS)
        lines = [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
        print(
            "usage: hemaedge COMMAND [options]   (hemaedge COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\nStart here: hemaedge count --demo"
        )
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"hemaedge {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        _console().print(f"[bold red]error:[/] unknown command {name!r}; try: hemaedge --help")
        return 2
    return _dispatch(name, argv[1:], f"hemaedge {name}")


def export_model_main(argv: list[str] | None = None) -> int:
    """Entry point of ``export-model`` (same as ``hemaedge export``)."""
    _quiet_opencv()
    argv = list(sys.argv[1:] if argv is None else argv)
    return _dispatch("export", argv, "export-model")
