#!/usr/bin/env bash
# Install a hemaedge microscope station on a Raspberry Pi (64-bit Raspberry Pi OS, Bookworm or Bullseye).
#
#   sudo deploy/raspberrypi/install.sh [--bundle DIR] [--source URI] [--no-service]
#
# Steps (safe to run again):
#   1. checks this is 64-bit Raspberry Pi OS (ONNX Runtime has no 32-bit ARM wheels);
#   2. apt: python3-picamera2 (libcamera's Python bindings come only from apt), venv, v4l-utils;
#   3. a 'hemaedge' system user in the video group, /var/lib/hemaedge as its home;
#   4. a virtualenv in /opt/hemaedge/venv with --system-site-packages (so picamera2 is visible),
#      hemaedge and ONNX Runtime CPU from pip, numpy kept < 2 to match the system picamera2 stack;
#   5. optionally copies a model bundle and checks it with 'hemaedge verify';
#   6. installs and starts the systemd unit hemaedge-station.service.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PREFIX=/opt/hemaedge
STATE=/var/lib/hemaedge
SERVICE_USER=hemaedge
BUNDLE=""
SOURCE_URI="picam://0"
PACKAGE="$REPO"
SERVICE=1
FORCE=0

usage() {
  cat <<'USAGE'
usage: sudo deploy/raspberrypi/install.sh [options]
  --bundle DIR     model bundle to install into /var/lib/hemaedge/bundle
  --source URI     camera for the service: picam://0 (default), v4l2:///dev/hemaedge-camera, 0, ...
  --package SPEC   what pip installs (default: this checkout)
  --no-service     do not install or start the systemd unit
  --force          install on a machine that does not look like a Raspberry Pi
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --source) SOURCE_URI=$2; shift 2 ;;
    --package) PACKAGE=$2; shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $*"

# --- 1. platform ----------------------------------------------------------------------------
MODEL=$(tr -d '\0' </proc/device-tree/model 2>/dev/null || true)
case "$MODEL" in
  "Raspberry Pi"*) say "board: $MODEL" ;;
  *) [ "$FORCE" -eq 1 ] || die "this does not look like a Raspberry Pi ('${MODEL:-unknown}'); use --force to install anyway" ;;
esac
[ "$(uname -m)" = aarch64 ] || die "$(uname -m) userland: install the 64-bit Raspberry Pi OS (ONNX Runtime publishes no 32-bit ARM wheels)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$(python3 -V) is too old: hemaedge needs Python >= 3.9 (Raspberry Pi OS Bullseye or newer)"

# --- 2. system packages ---------------------------------------------------------------------
say "apt: picamera2, Python venv, camera tools"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# --no-install-recommends keeps the Qt/OpenGL preview stack off a headless station.
apt-get install -y --no-install-recommends python3-picamera2 python3-venv python3-pip v4l-utils
python3 -c 'import picamera2' || die "python3-picamera2 is installed but does not import (see 'python3 -c \"import picamera2\"')"

# --- 3. user and folders --------------------------------------------------------------------
say "user '$SERVICE_USER' (group video: cameras and DMA heaps)"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --create-home --home-dir "$STATE" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
usermod -aG video "$SERVICE_USER"
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE" "$STATE/sessions"

# --- 4. virtualenv --------------------------------------------------------------------------
say "virtualenv $PREFIX/venv (--system-site-packages: the apt picamera2 stays visible)"
install -d "$PREFIX"
python3 -m venv --system-site-packages "$PREFIX/venv"
PIP=("$PREFIX/venv/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
# picamera2's compiled helpers (simplejpeg, ...) come from apt, built against numpy 1.x.
echo 'numpy<2' >"$CONSTRAINTS"
"${PIP[@]}" install --constraint "$CONSTRAINTS" "$PACKAGE"
"$PREFIX/venv/bin/python" -c 'import picamera2, onnxruntime, cv2; print("picamera2 ok; ONNX Runtime", onnxruntime.__version__, "; OpenCV", cv2.__version__)'

# --- 5. bundle ------------------------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
  say "bundle $BUNDLE -> $STATE/bundle"
  rm -rf "$STATE/bundle.new"
  cp -r "$BUNDLE" "$STATE/bundle.new"
  rm -rf "$STATE/bundle"
  mv "$STATE/bundle.new" "$STATE/bundle"
  chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE/bundle"
  runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hemaedge" verify "$STATE/bundle" || true
fi

say "hemaedge doctor"
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hemaedge" doctor ${BUNDLE:+--bundle "$STATE/bundle"} || true

# --- 6. service -----------------------------------------------------------------------------
if [ "$SERVICE" -eq 1 ]; then
  say "systemd unit hemaedge-station.service (camera $SOURCE_URI)"
  if [ ! -e /etc/default/hemaedge ]; then
    cat >/etc/default/hemaedge <<DEFAULTS
# Settings of hemaedge-station.service (read at each start).
HEMAEDGE_SOURCE=$SOURCE_URI
HEMAEDGE_BUNDLE=$STATE/bundle
# Extra options for 'hemaedge count', e.g. --target 200 --threads 4
HEMAEDGE_ARGS=
DEFAULTS
  fi
  install -m 0644 "$HERE/README.md" "$PREFIX/README-raspberrypi.md"
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
