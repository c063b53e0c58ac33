#!/usr/bin/env bash
# GPU check for supir-rt (issue 6): on a machine with one CUDA GPU and no network, installs nothing,
# runs the `full` architecture (random weights) per network at 1024² and a 1024² restore on every
# backend available there, within BUDGET_S seconds (default 470, under 8 minutes), and prints one
# table last. Parity with PyTorch eager fp32 is asserted before anything is timed.
#
#   bash benchmarks/gpu_check.sh                 # results under $OUT (if set) or benchmarks/results/gpu-<date>
#   BUDGET_S=900 STEPS=50 bash benchmarks/gpu_check.sh
#
# Phases (each under `timeout`; a phase cut short keeps the cases it finished, the JSON is
# rewritten after every case):
#   1. networks, PyTorch eager, fp32 (reference) / fp16 / bf16, latent 128x128
#   2. networks, PyTorch optimised (torch.compile + channels-last), fp16, latent 128x128
#   3. restore, STEPS steps (default 10) at 1024², eager fp32 / fp16 / bf16
#   4. ONNX Runtime: only the CPU provider exists on these machines (no onnxruntime-gpu), so it
#      runs the VAE and text networks on the CPU against PyTorch on the CPU, at latent 32x32, with
#      what is left of the budget (the 3.9 B-parameter UNet+adaptor export alone takes minutes).
#   TensorRT is tried in phase 1/2 and skipped with its reason when it is not installed.
set -u
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-470}
STEPS=${STEPS:-10}
START=$(date +%s)
RES=${OUT:-benchmarks/results}/gpu-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RES"
PY=${PYTHON:-python}

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

echo "== gpu_check: results in $RES, budget ${BUDGET_S} s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
if ! $PY - <<'EOF'
import importlib.util, sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
missing = [m for m in ("pytest", "supir_rt", "onnx", "onnxruntime", "PIL", "tokenizers", "safetensors")
           if importlib.util.find_spec(m) is None]
print("pytest-benchmark:", "present" if importlib.util.find_spec("pytest_benchmark") else
      "absent (the suite's own timer is used)")
if missing:
    print(f"missing modules: {missing} (pytest and supir_rt's dependencies are required)")
sys.exit(0 if torch.cuda.is_available() and not {"pytest", "supir_rt"} & set(missing) else 1)
EOF
then
    echo "gpu_check: needs a CUDA GPU, pytest and supir_rt importable (run from the repo, pip install -e . beforehand)"
    exit 2
fi

# Send SIGINT first so pytest prints its summary and the JSON already holds every finished case.
phase() {  # phase NAME MAX_SECONDS pytest-args...
    local name=$1 max=$2; shift 2
    local t; t=$(left)
    (( t > max )) && t=$max
    if (( t < 30 )); then echo "== $name: skipped, budget spent"; return; fi
    echo "== $name (up to ${t} s)"
    timeout -s INT -k 15 "$t" $PY -m pytest -q -p no:cacheprovider --results-dir "$RES" "$@" \
        > "$RES/$name.log" 2>&1
    local rc=$?
    tail -n 3 "$RES/$name.log"
    (( rc == 124 )) && echo "   ($name cut at ${t} s: finished cases are kept)"
}

COMMON=(--model-size full --device cuda --warmup 2 --rounds 5)
phase networks-eager 150 benchmarks/test_networks.py "${COMMON[@]}" --latent 128x128 \
    --backends torch,tensorrt --precisions fp32,fp16,bf16
phase networks-opt 130 benchmarks/test_networks.py "${COMMON[@]}" --latent 128x128 \
    --backends torch,torch-opt --precisions fp16 --networks unet_adaptor,vae_decoder
phase restore 130 benchmarks/test_pipeline.py --model-size full --device cuda --warmup 1 --rounds 2 \
    --latent 128x128 --steps "$STEPS" --backends torch --precisions fp32,fp16,bf16
phase onnxruntime-cpu 600 benchmarks/test_networks.py --model-size full --device cpu --warmup 1 --rounds 3 \
    --latent 32x32 --backends torch,onnxruntime --precisions fp32 \
    --networks dr_encoder,vae_encoder,vae_decoder,text_encoders

echo "== total $(( $(date +%s) - START )) s"
shopt -s nullglob
runs=("$RES"/run-*.json)
if (( ${#runs[@]} == 0 )); then echo "gpu_check: no case finished"; exit 1; fi
$PY benchmarks/report.py --plot "$RES/latency.png" --markdown "$RES/tables.md" "${runs[@]}" >/dev/null
$PY benchmarks/report.py --one-table "${runs[@]}"
