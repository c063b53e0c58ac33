#!/usr/bin/env bash
# GPU check of supir-rt's PyTorch CUDA path (issue 11): one prepared command for a machine with one
# CUDA GPU, PyTorch with CUDA, and no network, TensorRT or onnxruntime-gpu. Installs nothing; needs
# only this repository (weights are random: the official architecture with PyTorch's default init).
# Runs within BUDGET_S seconds (default 470, under 8 minutes) and always ends with ONE table:
#
#   bash benchmarks/gpu_check.sh              # results and table.md under $OUT (if set) or benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run    # tiny model on the CPU: checks the script end to end (a test runs it)
#   bash benchmarks/gpu_check.sh --fake-cuda  # tiny model on the fake CUDA device (CUDA build of torch, no GPU):
#                                             # every CUDA path of every phase runs; "fake" in place of times
#   BUDGET_S=900 bash benchmarks/gpu_check.sh
#
# Phases (benchmarks/cuda_check.py), each under `timeout` with a cap; time a phase does not use goes
# to the next ones; a phase cut short keeps the rows it finished (its JSON is rewritten per row):
#   step              one CFG step at 1024² (the CFG pair through unet_adaptor + the denoiser arithmetic),
#                     eager fp16, channels-last and contiguous                          (cap  45 s)
#   compiled          the same, torch.compile (inductor): the first call (a cold compile of the 3.9 B UNet,
#                     minutes) is a row of its own, written as soon as it returns; then timed, then + CUDA
#                     graphs                                                            (cap 300 s)
#   vae               VAE encoder / decoder at 1024², bf16 and fp32                     (cap  40 s)
#   restore           a 50-step 1024² restore, eager fp16, VAE and text encoders offloaded (cap 75 s)
#   restore-compiled  the same with compile + CUDA graphs, if time is left              (rest)
# Before the phases it says whether inductor can compile here (a C compiler and Python.h are needed at
# run time; without them the compiled rows say "compile FAILED, eager fallback").
set -u
cd "$(dirname "$0")/.."

DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); fi
if [[ "${1:-}" == "--fake-cuda" ]]; then  # every operation goes through Python there: roomier caps
    DRY=(--fake-cuda); BUDGET_S=${BUDGET_S:-3600}; CAP_SCALE=${CAP_SCALE:-8}
fi
BUDGET_S=${BUDGET_S:-470}
CAP_SCALE=${CAP_SCALE:-1}
START=$(date +%s)
RES=${OUT:-benchmarks/results}/gpu-$(date -u +%Y%m%dT%H%M%SZ)${DRY:+${DRY[0]/--/-}}
mkdir -p "$RES"
if [[ "${DRY[*]:-}" == "--fake-cuda" && -z "${PYTHON:-}" ]]; then
    PYTHON=$(bash .ci/fake_cuda_env.sh) || exit 2  # the CUDA build of torch, cached
fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-.whl}  # pure-Python dependencies the GPU image may lack, brought along as wheels

missing_packages() {  # what benchmarks/cuda_check.py's phases import (restore: the tokenizer's too) and this Python lacks
    $PY -c '
import importlib.util
need = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "tokenizers": "tokenizers", "ftfy": "ftfy",
        "wcwidth": "wcwidth", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))'
}
missing=$(missing_packages)
if [[ -n "$missing" && -d "$WHEELS" ]]; then
    echo "== installing $missing from $WHEELS/ (offline, one package at a time with its dependencies from there)"
    for pkg in $missing; do
        $PY -m pip install -q --no-index --find-links "$WHEELS" --no-compile --no-cache-dir --target /tmp/supir-rt-site \
            "$pkg" || echo "   $pkg: not installable from $WHEELS/"
    done
    export PYTHONPATH="$PYTHONPATH:/tmp/supir-rt-site"
    missing=$(missing_packages)
fi
if [[ -n "$missing" ]]; then
    echo "gpu_check: Python packages missing here: $missing. This machine has no network: on one that has, run"
    echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl $missing"
    echo "and bring the .whl folder along (or point WHEELS= at it)."
    exit 2
fi

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

echo "== gpu_check: results in $RES, budget ${BUDGET_S} s ${DRY[*]:-}"
# inductor / Triton compile C at run time: without a compiler or Python.h the compiled rows fall back to eager
CC_FOUND=$(command -v "${CC:-cc}" || command -v gcc || command -v clang || true)
PYH=$($PY -c 'import os, sysconfig; p = os.path.join(sysconfig.get_paths()["include"], "Python.h"); print(p if os.path.exists(p) else "")')
TRITON=$($PY -c 'import importlib.util; print("yes" if importlib.util.find_spec("triton") else "")')
lack=""
[[ -z "$CC_FOUND" ]] && lack+=" no C compiler (cc/gcc/clang);"
[[ -z "$PYH" ]] && lack+=" no Python.h (the python3-dev package);"
[[ -z "$TRITON" ]] && lack+=" no triton;"
if [[ -n "$lack" ]]; then
    echo "== note: torch.compile (inductor) cannot build kernels here:$lack the compiled rows will run eager (marked)"
else
    echo "== inductor prerequisites: C compiler $CC_FOUND, $PYH, triton"
fi
if (( ${#DRY[@]} == 0 )); then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
    if ! $PY -c 'import sys, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}"); sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: needs a CUDA GPU and PyTorch with CUDA (use --dry-run to check the script on a CPU)"
        exit 2
    fi
fi

phase() {  # phase NAME CAP_SECONDS
    local name=$1 cap=$(( $2 * CAP_SCALE )) t
    t=$(( $(left) - 10 ))  # keep 10 s for the table
    (( t > cap )) && t=$cap
    if (( t < 25 )); then echo "== $name: skipped, budget spent"; return; fi
    echo "== $name (up to ${t} s)"
    # SIGINT first: Python stops where it is; the rows finished so far are already on disk
    timeout -s INT -k 10 "$t" $PY benchmarks/cuda_check.py --phase "$name" --out "$RES" --budget $(( t - 15 )) \
        "${DRY[@]}" > "$RES/$name.log" 2>&1
    local rc=$?
    grep -E "^(Traceback|[A-Za-z_.]*Error|CUDA graph|torch.compile)" "$RES/$name.log" | tail -n 3
    (( rc == 124 || rc == 130 )) && echo "   ($name cut at ${t} s: finished rows are kept)"
    (( rc != 0 && rc != 124 && rc != 130 )) && echo "   ($name exited with $rc; see $RES/$name.log)"
    return 0
}

phase step 45
phase compiled 300
phase vae 40
phase restore 75
phase restore-compiled 600

echo "== total $(( $(date +%s) - START )) s"
$PY benchmarks/cuda_check.py --table "$RES" "${DRY[@]}" | tee "$RES/table.md"
