"""``hemaedge doctor``: what this machine has, and the exact step for each missing piece.

Checks: board (Jetson model and JetPack / L4T release, Raspberry Pi), Python
environment, TensorRT, CUDA (cuda-python and the GPU), ONNX Runtime and its
execution providers, OpenVINO, OpenCV (and whether it can open GStreamer/CSI
pipelines), cameras (/dev/video*, CSI through nvarguscamerasrc, picamera2), and
which backend ``hemaedge count`` would use for a bundle (``--bundle``), with
what was measured to choose it on a CPU (``--remeasure`` measures again). Every
probe is cheap (choosing a CPU backend for a bundle the first time measures for
a few seconds) and none of them fails the command: a missing piece is a row
with its fix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

OK, MISSING, WARN, OPTIONAL, INFO = "ok", "missing", "warn", "optional", "info"
JETPACK_BY_L4T = {"32": "4", "34": "5 (developer preview)", "35": "5", "36": "6", "38": "7"}
ORT_JETSON = {
    "5": "the onnxruntime-gpu wheel for JetPack 5 from the Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime): "
    "pip install ./onnxruntime_gpu-<version>-cp38-cp38-linux_aarch64.whl",
    "6": "pip install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126 "
    "(pick the index matching your CUDA: jp6/cu122 for JetPack 6.0)",
}


@dataclass
class Check:
    """One row of the report."""

    area: str
    status: str
    detail: str
    fix: str = ""


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _run(cmd: list[str], timeout: float = 5.0) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def parse_l4t(text: str) -> str:
    """``"35.4.1"`` from the first line of /etc/nv_tegra_release (``# R35 (release), REVISION: 4.1, ...``)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m[1]}.{m[2]}" if m else ""


def jetpack_major(l4t: str) -> str:
    """JetPack major version for an L4T release (``"35.4.1"`` -> ``"5"``), or ""."""
    return JETPACK_BY_L4T.get(l4t.split(".")[0], "") if l4t else ""


def check_board(root: str = "/") -> tuple[list[Check], dict]:
    """Board model, JetPack / L4T release; returns the rows and facts later checks use."""
    model = _read(os.path.join(root, "proc/device-tree/model"))
    l4t = parse_l4t(_read(os.path.join(root, "etc/nv_tegra_release")))
    facts = {
        "model": model,
        "jetson": bool(l4t) or "jetson" in model.lower(),
        "pi": "raspberry pi" in model.lower(),
        "l4t": l4t,
        "jetpack": jetpack_major(l4t),
    }
    rows = []
    if facts["jetson"]:
        rows.append(Check("board", OK, model or "NVIDIA Jetson"))
        pkg = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
        jp = f"JetPack {pkg.split('-')[0]}" if pkg else f"JetPack {facts['jetpack'] or '?'}.x (from L4T)"
        rows.append(
            Check(
                "JetPack / L4T",
                OK if l4t else WARN,
                f"{jp}, L4T {l4t or 'unknown'}",
                "" if pkg else "optional: sudo apt-get install nvidia-jetpack (TensorRT, cuDNN, VPI, samples)",
            )
        )
        if facts["jetpack"] == "4":
            rows.append(
                Check(
                    "JetPack / L4T",
                    WARN,
                    "JetPack 4 ships Python 3.6 and TensorRT 8.2; hemaedge needs Python >= 3.8",
                    "use the container (deploy/jetson/Dockerfile) or ONNX Runtime CPU; JetPack 4 boards "
                    "(Nano, TX2) cannot be upgraded to JetPack 5",
                )
            )
    elif facts["pi"]:
        rows.append(Check("board", OK, model))
    else:
        os_name = next(
            (
                ln.split("=", 1)[1].strip('"')
                for ln in _read(os.path.join(root, "etc/os-release")).splitlines()
                if ln.startswith("PRETTY_NAME=")
            ),
            platform.system(),
        )
        rows.append(Check("board", INFO, f"{platform.machine()} {os_name} (not a Jetson or Raspberry Pi)"))
    return rows, facts


def check_python(facts: dict) -> list[Check]:
    """Python version, virtualenv and whether it sees system packages."""
    from hemaedge.edge import __version__

    ver = platform.python_version()
    # 3.8 is JetPack 5's Python: the station runtime supports it (the workstation extra needs >= 3.9).
    rows = [
        Check(
            "python",
            OK if sys.version_info >= (3, 8) else MISSING,
            f"Python {ver}, hemaedge {__version__}",
            "" if sys.version_info >= (3, 8) else "hemaedge needs Python >= 3.8",
        )
    ]
    if sys.prefix != sys.base_prefix:
        cfg = _read(os.path.join(sys.prefix, "pyvenv.cfg"))
        system = bool(re.search(r"include-system-site-packages\s*=\s*true", cfg))
        need = facts["jetson"] or facts["pi"]
        rows.append(
            Check(
                "virtualenv",
                OK if system or not need else WARN,
                f"{sys.prefix} ({'sees' if system else 'does not see'} system site-packages)",
                ""
                if system or not need
                else f"recreate it with: python3 -m venv --system-site-packages {sys.prefix} (JetPack's TensorRT / "
                "OpenCV and Raspberry Pi OS's picamera2 are system packages)",
            )
        )
    return rows


def check_tensorrt(facts: dict) -> list[Check]:
    """TensorRT's Python bindings."""
    from hemaedge.edge.classify.engines import tensorrt_install_hint

    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return [
            Check(
                "TensorRT", MISSING if facts["jetson"] else OPTIONAL, f"not importable ({exc})", tensorrt_install_hint()
            )
        ]
    return [Check("TensorRT", OK, f"TensorRT {trt.__version__}")]


def check_cuda() -> list[Check]:
    """cuda-python and the GPU it sees."""
    from hemaedge.edge.classify.cuda_rt import INSTALL_HINT, CudaRuntime
    from hemaedge.edge.errors import HemaedgeError

    try:
        cuda = CudaRuntime()
    except HemaedgeError:
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        detail = "cuda-python not installed" + (f"; nvidia-smi sees {smi}" if smi else "; no NVIDIA GPU seen")
        return [Check("CUDA", MISSING if smi else OPTIONAL, detail, INSTALL_HINT)]
    try:
        n = cuda.device_count()
        if n == 0:
            return [
                Check(
                    "CUDA",
                    WARN,
                    "cuda-python present, but no CUDA device is visible",
                    "check the NVIDIA driver (nvidia-smi) or, in a container, run it with --runtime nvidia",
                )
            ]
        gpu = cuda.gpu(0)
    except HemaedgeError as exc:
        return [Check("CUDA", WARN, f"cuda-python present, device query failed: {exc}", "check the NVIDIA driver")]
    return [Check("CUDA", OK, f"{n} device(s); GPU 0: {gpu.name}, compute capability {gpu.compute_capability}")]


def check_onnxruntime(facts: dict) -> list[Check]:
    """ONNX Runtime and its execution providers."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        return [Check("ONNX Runtime", MISSING, f"not importable ({exc})", "pip install onnxruntime")]
    providers = ort.get_available_providers()
    short = ", ".join(p.replace("ExecutionProvider", "") for p in providers)
    rows = [Check("ONNX Runtime", OK, f"{ort.__version__}; providers: {short}")]
    if facts["jetson"] and "CUDAExecutionProvider" not in providers:
        fix = ORT_JETSON.get(facts["jetpack"], "an onnxruntime-gpu wheel built for your JetPack (Jetson Zoo)")
        rows.append(
            Check(
                "ONNX Runtime GPU",
                WARN,
                "CPU-only build on a Jetson (fallback when no TensorRT engine exists)",
                f"pip uninstall -y onnxruntime && {fix}",
            )
        )
    return rows


def check_openvino(facts: dict) -> list[Check]:
    """OpenVINO (the optional CPU backend) and its devices."""
    from hemaedge.edge.classify.openvino import install_hint, openvino_version

    version = openvino_version()
    if not version:
        return [
            Check(
                "OpenVINO",
                OPTIONAL,
                "not installed (optional CPU backend: fast INT8 for models such as EfficientNet)",
                install_hint(),
            )
        ]
    try:
        ov = importlib.import_module("openvino")
        devices = ", ".join(ov.Core().available_devices)
    except Exception as exc:  # noqa: BLE001 - a broken OpenVINO install is a finding, not a crash
        return [Check("OpenVINO", WARN, f"{version} installed but not usable ({type(exc).__name__}: {exc})")]
    return [Check("OpenVINO", OK, f"{version}; devices: {devices}")]


def check_opencv(facts: dict) -> list[Check]:
    """OpenCV, and GStreamer support (needed for CSI cameras on a Jetson)."""
    try:
        cv2 = importlib.import_module("cv2")
    except ImportError as exc:
        return [
            Check(
                "OpenCV",
                MISSING,
                f"not importable ({exc})",
                "pip install opencv-python-headless "
                "(on a Jetson: sudo apt-get install python3-opencv and a --system-site-packages venv)",
            )
        ]
    build = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\w+)", build)
    gst = bool(m and m[1].upper() == "YES")
    where = os.path.dirname(cv2.__file__)
    detail = f"{cv2.__version__} from {where}; GStreamer {'yes' if gst else 'no'}"
    if facts["jetson"] and not gst:
        return [
            Check(
                "OpenCV",
                WARN,
                detail,
                "pip's opencv wheels have no GStreamer, so CSI cameras cannot open: pip uninstall -y "
                "opencv-python opencv-python-headless (JetPack's python3-opencv then shows through the "
                "--system-site-packages venv)",
            )
        ]
    return [Check("OpenCV", OK, detail)]


def check_cameras(facts: dict, root: str = "/") -> list[Check]:
    """V4L2 devices, CSI (nvarguscamerasrc) on a Jetson, picamera2 on a Pi."""
    rows = []
    devs = sorted(Path(root, "dev").glob("video*"), key=lambda p: (len(p.name), p.name))
    if devs:
        names = []
        for d in devs:
            name = _read(os.path.join(root, f"sys/class/video4linux/{d.name}/name"))
            access = "" if os.access(d, os.R_OK | os.W_OK) else " (no access)"
            names.append(f"{d} {name}{access}".strip())
        blocked = any("(no access)" in n for n in names)
        rows.append(
            Check(
                "V4L2 cameras",
                WARN if blocked else OK,
                "; ".join(names),
                "sudo usermod -aG video $USER, then log out and in" if blocked else "",
            )
        )
    else:
        rows.append(
            Check(
                "V4L2 cameras",
                MISSING if (facts["jetson"] or facts["pi"]) else INFO,
                "no /dev/video* devices",
                "plug in the USB camera (or check the CSI ribbon cable); 'v4l2-ctl --list-devices' lists them",
            )
        )
    if facts["jetson"]:
        if _run(["gst-inspect-1.0", "nvarguscamerasrc"]):
            rows.append(Check("CSI camera", OK, "nvarguscamerasrc GStreamer element present (csi:// sources)"))
        else:
            rows.append(
                Check(
                    "CSI camera",
                    WARN,
                    "nvarguscamerasrc not found (needed for csi:// sources)",
                    "sudo apt-get install nvidia-l4t-gstreamer && sudo systemctl restart nvargus-daemon",
                )
            )
    if facts["pi"] or importlib.util.find_spec("picamera2") is not None:
        try:
            picamera2 = importlib.import_module("picamera2")
            cams = picamera2.Picamera2.global_camera_info()
            rows.append(
                Check(
                    "picamera2",
                    OK if cams else WARN,
                    f"{len(cams)} camera(s): " + ", ".join(str(c.get("Model", "?")) for c in cams),
                    "" if cams else "check the ribbon cable; 'rpicam-hello --list-cameras' lists cameras",
                )
            )
        except Exception as exc:  # noqa: BLE001 - picamera2/libcamera raise many kinds; report it as one row
            rows.append(
                Check(
                    "picamera2",
                    MISSING,
                    f"not usable ({type(exc).__name__}: {exc})",
                    "sudo apt-get install python3-picamera2 and a --system-site-packages venv "
                    "(deploy/raspberrypi/install.sh)",
                )
            )
    return rows


def check_bundle(path: str, remeasure: bool = False) -> list[Check]:
    """Which backend ``hemaedge count`` would use for a bundle and why: on a CPU, what was measured."""
    from hemaedge.edge.classify.select import select_backend
    from hemaedge.edge.errors import HemaedgeError
    from hemaedge.edge.station import DEFAULT_THREADS

    try:  # the threads hemaedge count uses, so this reads (or fills) the same measurement
        backend, reason = select_backend(path, threads=DEFAULT_THREADS, remeasure=remeasure)
    except HemaedgeError as exc:
        return [Check("bundle", MISSING, str(exc))]
    fix = ""
    if "hemaedge build-engine" in reason:
        fix = reason[reason.index("hemaedge build-engine") :].split(")")[0]
    rows = [Check("backend", OK, f"{path}: {reason}", fix)]
    for m in getattr(backend, "measurements", None) or []:
        if m.error:
            rows.append(Check("measured", WARN, f"{m.label} {m.precision}: not usable ({m.error})"))
            continue
        g = m.golden
        gold = (
            "no golden outputs to check"
            if g is None
            else f"golden top-1 {g['top1_agreement']:.2f}, max |Δp| {g['max_abs_diff']:.4f} vs {g['reference']} "
            + ("(passed)" if g["passed"] else "(FAILED)")
        )
        chosen = m.key == getattr(backend, "measured_key", "")
        rows.append(
            Check(
                "measured",
                OK if m.passed else WARN,
                f"{m.label} {m.precision} ({m.model_file}): {m.crops_per_s or 0:.0f} crops/s "
                f"(min {m.min or 0:.0f}, max {m.max or 0:.0f}); {gold}"
                + (" <- chosen" if chosen else "")
                + (f"; not eligible: {m.excluded}" if m.excluded else ""),
                "" if m.passed else f"hemaedge verify {path} --backend {m.key.split('/')[0]} --precision {m.precision}",
            )
        )
    return rows


def diagnose(bundle: str | None = None, root: str = "/", remeasure: bool = False) -> list[Check]:
    """All checks, in report order."""
    rows, facts = check_board(root)
    rows += check_python(facts)
    rows += check_tensorrt(facts)
    rows += check_cuda()
    rows += check_onnxruntime(facts)
    rows += check_openvino(facts)
    rows += check_opencv(facts)
    rows += check_cameras(facts, root)
    rows.append(runtime_summary(rows))
    if bundle:
        rows += check_bundle(bundle, remeasure)
    return rows


def runtime_summary(rows: list[Check]) -> Check:
    """The fastest runtime this machine can use, from the rows above."""
    have = {r.area for r in rows if r.status == OK}
    ort = next((r.detail for r in rows if r.area == "ONNX Runtime" and r.status == OK), "")
    if {"TensorRT", "CUDA"} <= have:
        best = "TensorRT engines (build one per bundle with: hemaedge build-engine BUNDLE)"
    elif "Tensorrt" in ort:
        best = "ONNX Runtime TensorRT EP"
    elif "CUDA" in ort.split("providers:")[-1]:
        best = "ONNX Runtime CUDA"
    elif ort and "OpenVINO" in have:
        best = (
            "ONNX Runtime CPU or OpenVINO CPU, whichever measures faster for the bundle (measured once per "
            "bundle; hemaedge doctor --bundle BUNDLE shows it)"
        )
    elif ort:
        best = "ONNX Runtime CPU"
    elif "OpenVINO" in have:
        best = "OpenVINO CPU"
    else:
        return Check("runtime", MISSING, "no inference runtime", "pip install onnxruntime")
    return Check("runtime", OK, f"hemaedge count will use {best}")


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``hemaedge doctor``."""
    p.add_argument("--bundle", help="also say which backend this bundle would run on here, and why")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="with --bundle: measure the CPU backends again instead of reading the cached measurement",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")


def run(args: argparse.Namespace) -> int:
    """Print the report (always exits 0: missing pieces are findings, not errors)."""
    if args.remeasure and not args.bundle:
        from hemaedge.edge.errors import UsageError

        raise UsageError("--remeasure needs --bundle BUNDLE (measurements are per bundle)")
    rows = diagnose(args.bundle, remeasure=args.remeasure)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {OK: "green", MISSING: "bold red", WARN: "yellow", OPTIONAL: "cyan", INFO: "dim"}
    t = Table(title="hemaedge doctor", show_lines=False)
    for col in ("check", "status", "found", "to fix"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r.area, f"[{style[r.status]}]{r.status}[/]", escape(r.detail), escape(r.fix))
    con = Console()
    con.print(t)
    todo = [r.area for r in rows if r.status in (MISSING, WARN)]
    optional = [r.area for r in rows if r.status == OPTIONAL]
    con.print(f"[yellow]To look at:[/] {', '.join(todo)}" if todo else "[green]Nothing required is missing.[/]")
    if optional:
        con.print(
            f"[cyan]Optional here[/] (acceleration; hemaedge runs on ONNX Runtime without them): {', '.join(optional)}"
        )
    return 0
