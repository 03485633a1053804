#!/usr/bin/env bash
# The GPU measurements of issues 4 and 7, prepared for a lent GPU machine (the device tool), in two calls on one
# warm machine. Stage first, here: bash scripts/gpu_stage.sh. Then, the second call at once after the first:
#
#     run(carry=[".gpu/a"], command="bash scripts/gpu_check.sh a", timeout_s=240)
#     run(carry=[".gpu/b"], command="bash scripts/gpu_check.sh b", timeout_s=480)
#
# A: ViT-B (random weights: speed and memory only) encoder inference by batch size and encoder-LoRA training
#    throughput with peak GPU memory, segment_anything's attention against the fused one with its relative positions
#    as a mask and folded into queries and keys (the CUDA default), bf16 (encoder_speed.py).
# B: a LiteMedSAM adapter for 30 films of each data set trained on the GPU, time to a validated adapter and test
#    Dice on the 10 films it never saw (label_efficiency.py, split 0: the same films as the CPU runs); LiteMedSAM
#    encoder speed; the engine's inference benchmark on the GPU.
# Each step has a time limit and prints as it goes; logs and JSON go to $OUT (at most 8 files come back), so a
# call cut short still returns what ran. The text encoder is the packaged MiniLM with float16 weights (embeddings
# within cosine 0.9996 of the float32 ones); nothing else differs from the CPU runs.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_check.sh a|b}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 XRAY_TEXTSEG_CACHE=/tmp/xray_textseg_cache

need() { [ -d "$1" ] || { echo "missing $1: $2"; exit 3; }; }
site() {  # the carried wheels, installed once into $2 (no network there)
    [ -d "$2" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$2" "$1"/*.whl
}
step() {  # NAME SECONDS COMMAND...: timed and logged; a failure or a time-out never stops the next step
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s) $(date +%T)"
    timeout "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
adapters() {  # what each GPU-trained adapter's run did
    "$PY" - <<'EOF'
import json, pathlib
for meta in sorted(pathlib.Path("/tmp/gpu_adapters").glob("*/metadata.json")):
    m = json.loads(meta.read_text())
    t = m.get("training", {})
    print(meta.parent.name, m.get("mode"), m.get("device"), {k: t.get(k) for k in ("seconds", "epochs_run",
          "best_epoch", "stopped")}, "batch", t.get("config", {}).get("batch_size"), "MB", m.get("size_bytes", 0) / 1e6)
EOF
}

case $part in
a)
    need .gpu/a "run scripts/gpu_stage.sh here and carry .gpu/a"
    site .gpu/a/whl .gpu/a/pysite
    export PYTHONPATH=lib:.gpu/a/site:.gpu/a/pysite
    {
        nvidia-smi -L
        "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, torch.cuda.get_device_name(0),
"transformers", transformers.__version__, "peft", peft.__version__)'
        step vit_b_encoder 200 "$PY" benchmarks/encoder_speed.py --backbone medsam_vit_b --device cuda \
            --attention plain fused-bias fused-fold --precisions bf16 --batch-sizes 1 8 16 --train-batch-sizes 4 8 \
            --out "$OUT/encoder_vit_b.json"
    } 2>&1 | tee "$OUT/a.log"
    ;;
b)
    need .gpu/b "run scripts/gpu_stage.sh here and carry .gpu/b"
    need .gpu/a/pysite "call A first, on this same warm machine (its files are gone on a fresh one)"
    site .gpu/b/whl .gpu/b/pysite
    export PYTHONPATH=lib:.gpu/a/site:.gpu/a/pysite:.gpu/b/pysite
    {
        for data in .gpu/b/data/jsrt_chest .gpu/a/data/oai_lower_limb; do
            name=$(basename "$data")
            step "adapter_$name" 170 "$PY" benchmarks/label_efficiency.py --data "$data" --k 30 --seeds 0 \
                --skip-baselines --device cuda --tag gpu --out "$OUT/le_$name" --adapters /tmp/gpu_adapters
            rm -f "$OUT/le_$name/results.md" "$OUT/le_$name/label_efficiency.png"  # the table is in the log
        done
        adapters
        step litemedsam_encoder 60 "$PY" benchmarks/encoder_speed.py --backbone litemedsam --device cuda \
            --precisions bf16 fp32 --batch-sizes 1 16 --train-batch-sizes 16 --out "$OUT/encoder_litemedsam.json"
        step inference 90 "$PY" benchmarks/inference.py --device cuda --repeats 3 --skip threads \
            --out "$OUT/inference_gpu.json"
    } 2>&1 | tee "$OUT/b.log"
    ;;
*)
    echo "usage: gpu_check.sh a|b"
    exit 2
    ;;
esac
