"""Architecture rules: edge/ never imports torch/export/calibration; the runtime imports without heavy deps."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# module prefixes edge/ must never import (the package installs as hemaedge.edge, hemaedge.export, ...)
FORBIDDEN_IN_EDGE = ("torch", "torchvision", "hemaedge.export", "hemaedge.calibration", "export", "calibration")
HARDWARE = ("tensorrt", "picamera2", "pycuda", "cuda", "torch", "openvino")


def _imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (dotted, as written)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_edge_never_imports_workstation_code_or_torch():
    offenders = {}
    for path in (ROOT / "edge").rglob("*.py"):
        bad = {n for n in _imports(path) if _under(n, FORBIDDEN_IN_EDGE)}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


@pytest.mark.skipif(
    sys.version_info < (3, 10),
    reason="sys.stdlib_module_names needs Python 3.10 (a static rule: the main suite checks it)",
)
def test_bundle_contract_is_stdlib_and_numpy_only():
    allowed = ("hemaedge.edge", "numpy", "cv2", "__future__", *sys.stdlib_module_names)
    for path in (ROOT / "edge" / "bundle").rglob("*.py"):
        extra = {n for n in _imports(path) if not _under(n, allowed)}
        assert not extra, f"{path.name} imports {extra}"


def test_runtime_imports_and_runs_with_hardware_and_torch_blocked(tmp_path):
    """Block torch/tensorrt/picamera2/cuda/openvino imports, then import every edge module and classify with ORT."""
    script = f"""
import sys, importlib, pkgutil
for name in {HARDWARE!r}:
    sys.modules[name] = None  # makes 'import name' raise ImportError
sys.path.insert(0, {str(ROOT / "tests")!r})
import hemaedge.edge
mods = [m.name for m in pkgutil.walk_packages(hemaedge.edge.__path__, 'hemaedge.edge.')]
for m in mods:
    importlib.import_module(m)
import numpy as np
from helpers import tiny_bundle
from hemaedge.edge.bundle import load_bundle
from hemaedge.edge.classify.onnxruntime import OrtBackend
b = load_bundle(tiny_bundle(__import__('pathlib').Path({str(tmp_path)!r}) / 'b', int8=False))
with OrtBackend(b, 'fp32') as be:
    p = be.classify(np.zeros((2, 3, 28, 28), np.float32))
assert p.shape == (2, 8)
from hemaedge.edge.classify.select import select_backend
from hemaedge.edge.errors import MissingDependencyError
be, why = select_backend(b, notify=lambda text: None)  # auto measures the CPU backends there are: ORT alone here
assert type(be).__name__ == 'OrtBackend' and 'OpenVINO' not in why, why
try:
    select_backend(b, 'openvino')
    raise AssertionError('--backend openvino without openvino')
except MissingDependencyError as exc:
    assert "pip install 'hemaedge[openvino]'" in str(exc) and len(str(exc).splitlines()) == 1, exc
print('imported', len(mods))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 10


def test_station_cli_starts_without_torch():
    script = (
        "import sys; sys.modules['torch'] = None; from hemaedge.cli import main; raise SystemExit(main(['--help']))"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "count" in res.stdout
    script = "import sys; sys.modules['torch'] = None; from hemaedge.cli import main; raise SystemExit(main(['train']))"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "hemaedge[export]" in res.stderr


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="tomllib needs Python 3.11 (a static rule: the main suite checks it)"
)
def test_every_package_folder_installs_under_the_hemaedge_namespace():
    """edge/, export/ and calibration/ install as hemaedge.edge, ...: a new package folder must be listed in pyproject."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {alias: ROOT / folder for alias, folder in conf["package-dir"].items()}
    expected = set()
    for alias, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            expected.add(".".join((alias, *rel)))
    assert set(conf["packages"]) == expected


def _setuptools_version() -> tuple[int, ...]:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("setuptools").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed, or an odd version string
        return (0,)


@pytest.mark.skipif(
    _setuptools_version() < (68,),
    reason="this venv's setuptools is older than the build's setuptools>=68 (the JetPack 5 venv): the wheel is built "
    "without build isolation here, so the main suite checks it",
)
def test_the_wheel_a_station_installs_holds_every_package_and_the_shipped_models(tmp_path):
    """deploy/*/install.sh pip-installs a wheel, not the checkout: it must carry the folders mapped under hemaedge.*
    and the package data (shipped bundles, checkpoints)."""
    import zipfile

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for folder, alias in (
        ("edge", "hemaedge/edge"),
        ("export", "hemaedge/export"),
        ("evaluation", "hemaedge/evaluation"),
    ):
        for py in (ROOT / folder).rglob("*.py"):
            assert f"{alias}/{py.relative_to(ROOT / folder).as_posix()}" in names, py
    for static in [*(ROOT / "edge").glob("*/static/*")]:  # the review page and the report's stylesheet
        assert f"hemaedge/edge/{static.relative_to(ROOT / 'edge').as_posix()}" in names, static
    for manifest in (ROOT / "edge" / "models").glob("*/manifest.json"):
        bundle = json.loads(manifest.read_text())
        for art in bundle["artifacts"]:
            assert f"hemaedge/edge/models/{manifest.parent.name}/{art['file']}" in names
