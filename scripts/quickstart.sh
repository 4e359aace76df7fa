#!/usr/bin/env bash
# Quickstart on the CPU: set up (scripts/setup.sh, idempotent), extract the demo
# vectors from examples/*.jsonl with the demo model (once), then serve them with
# vLLM's OpenAI-compatible API on http://127.0.0.1:8000.
#
#   scripts/quickstart.sh                      # then try examples/client_openai.py
#   ICV_VLLM_ALLOW_RUNTIME_UPDATES=1 scripts/quickstart.sh   # + the /v1/icv management API
#   scripts/quickstart.sh --port 9000 --api-key secret       # any vllm serve flag
#
# Env: ICV_VLLM_CACHE (default .cache, as scripts/setup.sh), VLLM_CPU_KVCACHE_SPACE (GiB, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

CACHE="${ICV_VLLM_CACHE:-.cache}"
MODEL="$CACHE/models/SmolLM2-135M-Instruct"   # where `icv-vllm demo-model` (run by setup.sh) puts it
ICV_DIR="$CACHE/icv"
mkdir -p "$ICV_DIR"

for pairs in examples/polite.jsonl examples/formal.jsonl; do
    name="$(basename "$pairs" .jsonl)"
    if [ ! -f "$ICV_DIR/$name.safetensors" ]; then
        echo "quickstart: extracting vector '$name' from $pairs"
        .venv/bin/icv-vllm extract --model "$MODEL" --pairs "$pairs" --out "$ICV_DIR/$name.safetensors" --quiet
    fi
done

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
echo "quickstart: serving $MODEL as 'SmolLM2-135M-Instruct' with vectors from $ICV_DIR"
# later flags win: "$@" can override any of these
exec .venv/bin/icv-vllm serve "$MODEL" --icv-dir "$ICV_DIR" \
    --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port 8000 \
    --max-model-len 2048 "$@"
