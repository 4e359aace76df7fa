#!/usr/bin/env bash
# GPU check of the ICV shift kernels on a machine with only torch + triton
# (no vLLM, nothing of this project installed): kernel tests on CUDA, the
# steering op under a CUDA graph with changing tables and bank contents
# (bf16/fp16/fp32) and the kernel's bandwidth against a device copy
# (benchmarks/gpu_graph_check.py), then the kernel benchmark, all output into
# one results file. Under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]   (default benchmarks/results/gpu_check.md)
#
# icv_vllm (with its kernels) is made importable from the checkout through a
# temporary icv_vllm/ linking every entry of repo/icv_vllm plus a kernels ->
# repo/kernels link (none of it imports vLLM at import time; the C kernel is
# not built there, so the CPU parts use the torch path). pytest runs from that temp
# dir with --import-mode=importlib so the repo root (whose icv_vllm/ has no
# kernels/) never lands on sys.path, and --noconftest because tests/conftest.py
# needs the full test dependencies. Without CUDA the same commands run the
# CPU parts (Triton through its interpreter, in the tests' subprocess).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${1:-$REPO/benchmarks/results/gpu_check.md}")
PY=${PYTHON:-python3}
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/icv_vllm"
for entry in "$REPO"/icv_vllm/*; do ln -s "$entry" "$WORK/icv_vllm/$(basename "$entry")"; done
ln -s "$REPO/kernels" "$WORK/icv_vllm/kernels"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
cd "$WORK" || exit 1

status=0
{
  echo "# ICV kernel check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet -- kernels 2>/dev/null || echo ' (kernels/ modified)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "
import torch, icv_vllm.kernels as k
print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())
print('triton', 'missing' if k.icv_shift_triton is None else __import__('triton').__version__)
print('kernels from', k.__file__)"
  echo '```'
  echo
  echo "## Tests"
  echo
  echo '```'
  timeout 120 "$PY" -m pytest "$REPO/tests/kernels" -q -rs -p no:cacheprovider --noconftest \
    --import-mode=importlib --rootdir "$REPO/tests/kernels" || status=1
  echo '```'
  echo
  timeout 90 "$PY" "$REPO/benchmarks/gpu_graph_check.py" || status=1
  echo
  timeout 150 "$PY" "$REPO/benchmarks/kernel.py" --out "$WORK/kernel.md" > /dev/null || status=1
  cat "$WORK/kernel.md" 2>/dev/null || echo "benchmark produced no table"
  echo
  echo "exit status: $status"
} > >(tee "$OUT") 2>&1
wait  # for tee
echo "results written to $OUT" >&2
exit $status
