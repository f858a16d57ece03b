#!/usr/bin/env bash
# The GPU check (issue 13), ≤ 8 minutes on one GPU. Prints AGREE / THROUGHPUT / RATIO / STORE lines; exits non-zero
# if CUDA and CPU disagree or the 2-rank store differs from the 1-rank one.
#
#   bash bench/gpu.sh                  # on a GPU machine (cifar10_unet_config() throughput, NCCL if ≥ 2 GPUs)
#   bash bench/gpu.sh --device cpu     # CPU smoke test at tiny size (what CI runs: tests/test_gpu_script.py)
#
# (a) factors and scores on the device vs the CPU, float64, small UNet with attention (≤ 1e-4 relative);
# (b) per-example gradient ÷ training throughput (one draw per row), curvature rows/s, store examples/s on
#     cifar10_unet_config() in float32, TF32 and bf16 autocast (bf16 numbers only; its scores are not validated);
# (c) a 2-rank store build (NCCL; gloo with --device cpu) equal to the 1-rank one, when ≥ 2 GPUs exist.
set -euo pipefail
DEVICE=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [[ "$DEVICE" == cpu ]]; then
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  SIZE=tiny; CONFIG=tiny; BATCH=4; REPEATS=1; DTYPES="float32"; NGPU=0
else
  SIZE=small; CONFIG=cifar10; BATCH=32; REPEATS=3; DTYPES="float32 tf32 bf16"
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
echo "# gpu.sh device=$DEVICE size=$SIZE config=$CONFIG $(date -u +%FT%TZ)"

"$PY" "$HERE/gpu_check.py" agree --device "$DEVICE" --size "$SIZE"

for dt in $DTYPES; do
  if [[ "$dt" == bf16 ]]; then
    "$PY" "$HERE/gpu_check.py" throughput --device "$DEVICE" --config "$CONFIG" --batch-size "$BATCH" \
      --repeats "$REPEATS" --dtype "$dt" || echo "THROUGHPUT dtype=bf16 failed (see above)"
  else
    "$PY" "$HERE/gpu_check.py" throughput --device "$DEVICE" --config "$CONFIG" --batch-size "$BATCH" \
      --repeats "$REPEATS" --dtype "$dt"
  fi
done

if [[ "$DEVICE" == cpu || "$NGPU" -ge 2 ]]; then
  "$PY" "$HERE/gpu_check.py" store --device "$DEVICE" --size "$SIZE" --out "$TMP/one"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "$HERE/gpu_check.py" store --device "$DEVICE" \
    --size "$SIZE" --out "$TMP/two"
  "$PY" "$HERE/gpu_check.py" same-store "$TMP/one" "$TMP/two"
else
  echo "STORE skipped: $NGPU GPU(s), the 2-rank NCCL build needs 2"
fi
echo "# gpu.sh done $(date -u +%FT%TZ)"
