#!/usr/bin/env bash
# The interpreter of the fake-CUDA layer (tests/fake_cuda): the CUDA build of PyTorch, which installs and
# imports on a machine without a GPU, in its own virtual environment, cached between runs so that a
# machine downloads it once (about 4.8 GB on disk; docs/cuda.md). Idempotent: a complete environment
# (its marker file names exactly the packages below, written last) is reused as it is; anything else is
# completed with pip, which keeps what is already installed. The repository itself is not installed
# (tests run it from the checkout with PYTHONPATH), so one environment serves every checkout.
#
#   FAKE_PY=$(bash .ci/fake_cuda_env.sh)      # progress on stderr, the interpreter's path on stdout
#
# TORCH_CUDA_VERSION: the CUDA torch to trace with (default: what the GPU machines run, 2.11.0).
set -euo pipefail
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.11.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/supir-rt/ci
VENV=${SUPIR_RT_FAKE_CUDA_VENV:-$CACHE/torch-cuda-${TORCH_CUDA_VERSION%.*}}
# supir-rt's import-time dependencies (pyproject.toml) and pytest; nothing else is needed to trace
PACKAGES="torch==$TORCH_CUDA_VERSION numpy safetensors tokenizers ftfy regex pillow pyyaml tqdm pytest"
MARKER=$VENV/.supir-rt-complete
START=$(date +%s)

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$PACKAGES" && -x "$VENV/bin/python" ]]; then
    echo "fake-CUDA env: reusing $VENV" >&2
else
    echo "fake-CUDA env: preparing $VENV (first time on this machine: downloads about 3 GB)" >&2
    mkdir -p "$(dirname "$VENV")"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    rm -f "$MARKER"
    # shellcheck disable=SC2086  # PACKAGES is a list of requirement strings
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PACKAGES >&2
    "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "torch has no CUDA build")'
    echo "$PACKAGES" > "$MARKER"
fi
"$VENV/bin/python" -c 'import torch; print(f"fake-CUDA env: torch {torch.__version__} (CUDA {torch.version.cuda})", end="")' >&2
echo ", $(du -sh "$VENV" 2>/dev/null | cut -f1), ready in $(( $(date +%s) - START )) s" >&2
echo "$VENV/bin/python"
