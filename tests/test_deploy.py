"""Static checks of deploy/: shellcheck on the install scripts, systemd-analyze verify on the units.

Both tools are skipped (with the reason) where they are not installed; CI installs them
(apt-get install shellcheck systemd). ``systemd-analyze verify`` needs the unit's
ExecStart binary to exist, so the unit is verified inside a scratch root holding the
host's system units and a stub /opt/hemaedge/venv/bin/hemaedge; it exits 0 even when
it ignores a bad setting, so any message about the unit counts as a failure.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
UNITS = sorted(DEPLOY.rglob("*.service"))
SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)


def test_deploy_files_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    for need in (
        "jetson/install.sh",
        "jetson/hemaedge-station.service",
        "jetson/Dockerfile",
        "jetson/README.md",
        "jetson/99-hemaedge-camera.rules",
        "raspberrypi/install.sh",
        "raspberrypi/hemaedge-station.service",
        "raspberrypi/README.md",
    ):
        assert need in names
    for script in SCRIPTS:
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_shellcheck_clean(script):
    out = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or SYSTEM_UNITS is None,
    reason="systemd-analyze or the system unit directory is missing (apt-get install systemd)",
)
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_systemd_unit_verifies(unit, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    stub = root / "opt/hemaedge/venv/bin/hemaedge"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
        capture_output=True,
        text=True,
    )
    messages = [ln for ln in (out.stdout + out.stderr).splitlines() if unit.name in ln]
    assert out.returncode == 0 and not messages, out.stdout + out.stderr
