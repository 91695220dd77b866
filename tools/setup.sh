#!/usr/bin/env bash
# Set up edgeva on a fresh Debian/Ubuntu machine: system packages, the venv, the demo clip,
# and (when the machine is connected) the demo's real weights.
# Idempotent: re-running only fills in what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(ffmpeg libgl1 libglib2.0-0 systemd
              python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools
              gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
              gstreamer1.0-plugins-ugly gstreamer1.0-libav)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The torch pair first, pinned to the builds this project is tested with; then the rest.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null \
  || .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"

.venv/bin/python tools/make_clips.py --out videos

# Real weights for the demo (yolov8n.pt, MobileNetV3 IMAGENET1K) through the libraries' own
# downloads into weights/. Offline this fails, and setup carries on: the demo then runs with
# random weights and says so at start-up and in `edgeva stats`.
if ! timeout 300 .venv/bin/python tools/fetch_weights.py --out weights; then   # bounded: a network that drops packets
  echo "setup: WARNING: real weights could not be fetched (offline?); the demo runs with RANDOM weights" \
       "(its counts are noise). Re-run tools/setup.sh on a connected machine to fetch them." >&2
fi
echo "setup: done. Run: .venv/bin/edgeva run --config configs/demo.yaml"
