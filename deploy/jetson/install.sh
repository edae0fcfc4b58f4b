#!/usr/bin/env bash
# Install a hemaedge microscope station on a Jetson (JetPack 5 or 6).
#
#   sudo deploy/jetson/install.sh [--bundle DIR] [--source URI] [--build-engine] [--no-service]
#
# What it does (each step says what it is doing; safe to run again):
#   1. checks this is a Jetson on JetPack 5 (L4T R35: Python 3.8, TensorRT 8.4/8.5, CUDA 11.4)
#      or 6 (L4T R36: Python 3.10, TensorRT 8.6/10.x, CUDA 12.x);
#   2. apt: Python venv, TensorRT's Python bindings, GStreamer-enabled OpenCV, camera tools;
#   3. a 'hemaedge' system user in the video group, with /var/lib/hemaedge as its home;
#   4. a virtualenv in /opt/hemaedge/venv created with --system-site-packages, so JetPack's
#      TensorRT and OpenCV (with GStreamer, needed for CSI cameras) are visible; pip's OpenCV
#      wheel, which has no GStreamer, is removed from the venv so it cannot shadow them;
#   5. optionally copies a model bundle and builds this board's TensorRT engine;
#   6. installs and starts the systemd unit hemaedge-station.service.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PREFIX=/opt/hemaedge
STATE=/var/lib/hemaedge
SERVICE_USER=hemaedge
BUNDLE=""
SOURCE_URI="csi://0"
PACKAGE="$REPO"
BUILD_ENGINE=0
SERVICE=1
ORT_WHEEL=""
PY=python3

usage() {
  cat <<'EOF'
usage: sudo deploy/jetson/install.sh [options]
  --bundle DIR        model bundle to install into /var/lib/hemaedge/bundle
  --source URI        camera for the service: csi://0 (default), v4l2:///dev/hemaedge-camera, 0, ...
  --package SPEC      what pip installs (default: this checkout)
  --ort-wheel FILE    an onnxruntime-gpu wheel for this JetPack (optional; see README.md)
  --build-engine      build this board's TensorRT engine into the bundle (minutes)
  --python PY         interpreter for the venv (default python3, JetPack's: 3.8 on JetPack 5, 3.10 on
                      JetPack 6; TensorRT's Python bindings exist only for it, so keep the default)
  --no-service        do not install or start the systemd unit
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --source) SOURCE_URI=$2; shift 2 ;;
    --package) PACKAGE=$2; shift 2 ;;
    --ort-wheel) ORT_WHEEL=$2; shift 2 ;;
    --build-engine) BUILD_ENGINE=1; shift ;;
    --python) PY=$2; shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Does this Python's cv2 import, and was it built with GStreamer? Prints where it comes from.
cv2_has_gstreamer() {
  "$1" - <<'PY'
import re, sys
try:
    import cv2
except ImportError:
    sys.exit(1)
gst = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
print("OpenCV", cv2.__version__, "from", cv2.__file__, "GStreamer:", gst[1] if gst else "?")
sys.exit(0 if gst and gst[1] == "YES" else 1)
PY
}

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $*"
[ -r /etc/nv_tegra_release ] || die "/etc/nv_tegra_release not found: this is not a Jetson running JetPack (for a Raspberry Pi use deploy/raspberrypi/install.sh)"

# --- 1. which JetPack -----------------------------------------------------------------------
L4T_MAJOR=$(sed -n 's/^# R\([0-9]*\) (release).*/\1/p' /etc/nv_tegra_release | head -n 1)
case "$L4T_MAJOR" in
  # cuda-python's major version must match JetPack's CUDA (11.4 on JetPack 5, 12.x on JetPack 6). On
  # JetPack 5 (Python 3.8, aarch64) the newest that installs is 11.8.2: 11.8.6 and 11.8.7 are shells around
  # cuda-bindings, which has no Python 3.8 wheels; '<11.8.3' spares pip that backtracking.
  35) JETPACK=5; CUDA_PYTHON='cuda-python>=11.4,<11.8.3' ;;
  36) JETPACK=6; CUDA_PYTHON='cuda-python>=12.2,<13' ;;
  32) die "L4T R32 is JetPack 4 (Python 3.6, TensorRT 8.2): hemaedge needs Python >= 3.8. Jetson Nano/TX2 cannot move to JetPack 5; run ONNX Runtime CPU on another machine, or see README.md" ;;
  *) die "unsupported L4T release R${L4T_MAJOR:-?} (need R35 = JetPack 5 or R36 = JetPack 6)" ;;
esac
say "Jetson: $(tr -d '\0' </proc/device-tree/model 2>/dev/null || echo unknown), L4T R$L4T_MAJOR (JetPack $JETPACK)"

# --- 2. system packages ---------------------------------------------------------------------
say "apt: Python venv, TensorRT Python bindings, GStreamer, camera tools"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends python3-venv python3-pip python3-libnvinfer \
  gstreamer1.0-tools v4l-utils
if [ "$PY" != python3 ]; then
  apt-get install -y --no-install-recommends "$PY" "$PY-venv"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 8))' || die "$("$PY" -V 2>&1) is too old: hemaedge needs Python >= 3.8"
say "Python: $("$PY" -V 2>&1) (JetPack $JETPACK)"
if ! cv2_has_gstreamer python3; then
  if [ "$JETPACK" -eq 5 ]; then
    # JetPack 5's own OpenCV (4.5.4, GStreamer on; part of nvidia-jetpack) rather than Ubuntu 20.04's 4.2.
    say "apt: OpenCV with GStreamer (JetPack's nvidia-opencv)"
    apt-get install -y --no-install-recommends nvidia-opencv || apt-get install -y --no-install-recommends python3-opencv
  else
    say "apt: OpenCV with GStreamer (python3-opencv)"
    apt-get install -y --no-install-recommends python3-opencv
  fi
fi
if ! "$PY" -c 'import tensorrt; print("TensorRT", tensorrt.__version__)'; then
  if [ "$PY" = python3 ]; then
    die "TensorRT's Python bindings are not importable: sudo apt-get install nvidia-jetpack, then run this again"
  fi
  echo "warning: TensorRT is not importable from $PY: the station will run ONNX Runtime instead" >&2
fi

# --- 3. user and folders --------------------------------------------------------------------
say "user '$SERVICE_USER' (groups: video$(getent group render >/dev/null && echo ', render'))"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --create-home --home-dir "$STATE" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
usermod -aG video "$SERVICE_USER"
if getent group render >/dev/null; then usermod -aG render "$SERVICE_USER"; fi
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE" "$STATE/sessions"

# --- 4. virtualenv --------------------------------------------------------------------------
say "virtualenv $PREFIX/venv (--system-site-packages: JetPack's TensorRT and OpenCV stay visible)"
install -d "$PREFIX"
"$PY" -m venv --system-site-packages "$PREFIX/venv"
PIP=("$PREFIX/venv/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
# JetPack's cv2 and TensorRT bindings are built against numpy 1.x: keep numpy below 2 in the venv.
# (On JetPack 5 pip puts numpy 1.24 in the venv over Ubuntu 20.04's 1.17, which is older than hemaedge needs;
# modules built against an older numpy 1.x run with a newer 1.x.)
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo 'numpy<2' >"$CONSTRAINTS"
"${PIP[@]}" install --constraint "$CONSTRAINTS" "$PACKAGE" "$CUDA_PYTHON"
if [ -n "$ORT_WHEEL" ]; then
  say "ONNX Runtime GPU wheel $ORT_WHEEL"
  "${PIP[@]}" uninstall -y onnxruntime || true
  "${PIP[@]}" install --constraint "$CONSTRAINTS" "$ORT_WHEEL"
fi
# pip pulled opencv-python-headless (a hemaedge dependency), which has no GStreamer and would
# shadow JetPack's OpenCV: when the system OpenCV has GStreamer, remove the wheel from the venv.
if cv2_has_gstreamer "$PY" >/dev/null; then
  "${PIP[@]}" uninstall -y opencv-python-headless opencv-python opencv-contrib-python >/dev/null 2>&1 || true
  cv2_has_gstreamer "$PREFIX/venv/bin/python" \
    || die "the venv does not see the system OpenCV: check 'pip list | grep -i opencv' in $PREFIX/venv"
else
  echo "warning: no GStreamer-enabled OpenCV for $PY: keeping pip's OpenCV; USB cameras work, CSI (csi://) cameras will not" >&2
fi

# --- 5. bundle and engine -------------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
  say "bundle $BUNDLE -> $STATE/bundle"
  rm -rf "$STATE/bundle.new"
  cp -r "$BUNDLE" "$STATE/bundle.new"
  rm -rf "$STATE/bundle"
  mv "$STATE/bundle.new" "$STATE/bundle"
  chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE/bundle"
  if [ "$BUILD_ENGINE" -eq 1 ]; then
    say "building this board's TensorRT engine (several minutes)"
    runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hemaedge" build-engine "$STATE/bundle" --allow-fp16-fallback
    runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hemaedge" verify "$STATE/bundle"
  fi
fi

say "hemaedge doctor"
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hemaedge" doctor ${BUNDLE:+--bundle "$STATE/bundle"} || true

# --- 6. service -----------------------------------------------------------------------------
if [ "$SERVICE" -eq 1 ]; then
  say "systemd unit hemaedge-station.service (camera $SOURCE_URI)"
  if [ ! -e /etc/default/hemaedge ]; then
    cat >/etc/default/hemaedge <<EOF
# Settings of hemaedge-station.service (read at each start).
HEMAEDGE_SOURCE=$SOURCE_URI
HEMAEDGE_BUNDLE=$STATE/bundle
# Extra options for 'hemaedge count', e.g. --target 200 --precision int8
HEMAEDGE_ARGS=
EOF
  fi
  install -m 0644 "$HERE/README.md" "$PREFIX/README-jetson.md"
  install -m 0644 "$HERE/hemaedge-station.service" /etc/systemd/system/hemaedge-station.service
  systemctl daemon-reload
  systemctl enable hemaedge-station.service
  if [ -d "$STATE/bundle" ]; then
    systemctl restart hemaedge-station.service
    systemctl --no-pager --lines=5 status hemaedge-station.service || true
  else
    echo "no bundle in $STATE/bundle yet: copy one there (or rerun with --bundle DIR), then: sudo systemctl start hemaedge-station"
  fi
fi
say "done. Logs: journalctl -u hemaedge-station -f"
