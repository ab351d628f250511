#!/usr/bin/env bash
# GPU benchmarks in one command (< 12 minutes on one NVIDIA GPU, no network needed):
#   1. input pipeline: ours vs the reference's loader, batches made ready on the GPU
#   2. BEiT-base@224 training images/s: bf16 (our loop) vs the reference's fp32 loop
#   3. efficientnet_lite0 training at 64->224 (fp32 and bf16)
#   4. each GPU recipe (a recipe whose header states its "# GPU memory"): its real architecture, randomly initialised
#      (--no-pretrained), trains a few steps as written and with grad checkpointing: images/s and
#      torch.cuda.max_memory_allocated, to hold against the header's estimate (benchmarks/gpu_memory.py)
# Results: one table on stdout; each script also appends its section to BENCHMARKS.md.
# Needs torch, timm, transformers, accelerate and this package (pip install --no-deps -e .).
# Data: ../shared/data/cub100-lr when present, else a synthetic set (or DATA=/path).
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run  # on any CPU: tiny sizes, few steps, nothing recorded; proves the script works
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=cuda
EXTRA=()
SLACK=1  # time limits are sized for the GPU; a dry run on a shared CPU gets more
if [[ "${1:-}" == "--dry-run" ]]; then
  DEVICE=cpu
  EXTRA=(--dry-run)
  SLACK=5
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2
  exit 2
fi
if [[ -n "${DATA:-}" ]]; then EXTRA+=(--data "$DATA"); fi
if [[ "$DEVICE" == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA GPU visible to torch; use --dry-run to check the script on a CPU" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 LOWRES_BIRDS_CACHE=${LOWRES_BIRDS_CACHE:-$(mktemp -d)}
LOG=$(mktemp)
started=$(date +%s)

# Each step has its own time limit; its output goes to stderr as it comes and its last stdout line is its result.
step() {
  local name=$1 limit=$2 status=0
  shift 2
  timeout $((limit * SLACK)) "$PYTHON" "$@" "${EXTRA[@]}" | tee "$LOG" | sed -u "s/^/  [$name] /" >&2 || status=$?
  if [[ $status == 0 ]]; then
    printf '| %-22s | %s |\n' "$name" "$(tail -n 1 "$LOG")" >>"$LOG.table"
  else
    printf '| %-22s | FAILED (exit %s): %s |\n' "$name" "$status" "$(tail -n 1 "$LOG")" >>"$LOG.table"
  fi
}

: >"$LOG.table"
step "input pipeline" 150 benchmarks/input_pipeline.py --device "$DEVICE"
step "BEiT-base@224 training" 200 benchmarks/train_throughput.py --device "$DEVICE" --only beit-reference,beit,beit-bf16
step "lite0 64->224 training" 100 benchmarks/train_throughput.py --device "$DEVICE" --only lite0-224,lite0-224-bf16
for recipe in $(grep -l '^# GPU memory' src/lowres_birds/recipes/*.yaml | xargs -n 1 basename | sed 's/\.yaml$//'); do
  step "$recipe memory" 200 benchmarks/gpu_memory.py --measure --device "$DEVICE" --recipe "$recipe"
  step "$recipe memory, ckpt" 200 benchmarks/gpu_memory.py --measure --device "$DEVICE" --recipe "$recipe" --grad-checkpointing
done

echo
echo "| benchmark | result |"
echo "|---|---|"
cat "$LOG.table"
echo
echo "device: $DEVICE; total $(( $(date +%s) - started ))s"
failed=$(grep -c FAILED "$LOG.table" || true)
rm -f "$LOG" "$LOG.table"
[[ "$failed" == 0 ]]
