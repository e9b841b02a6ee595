#!/usr/bin/env bash
# One prepared GPU check, ~8 minutes on one H100/H200: install the carried wheels (.whl/), check
# the attention backends against the explicit math on the GPU, then the step_bench ladder
# (benchmarks/gpu_ladder.py: large and base, micro 16/32/64, ZeRO 1/2/3, eager vs compiled, SDPA
# vs flex, one profile, the host-sync check; last, if the budget reaches them, CUDA graphs and
# packed unimodal passes) within GPU_CHECK_BUDGET_S seconds, most important rows first. Prints
# the table for benchmarks/RESULTS.md; everything lands in $OUT (gpu.log, rows.jsonl, table.md,
# profile/ traces).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # here, on a CPU: tiny preset, one step a row
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-390}"  # ladder only; setup and the attention check take ~1 min more
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore
# DeepSpeed 0.19.8 cannot parse arch names such as "9.0a" should it JIT-build an op
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ "$DRY_RUN" != 1 ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
PY=python3; [ "$DRY_RUN" = 1 ] && PY=python
{
  date -u +%FT%TZ
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN on the CPU: tiny preset, fp32, one step per row, compiled rows run eager"
    PRESET=tiny; LADDER_FLAG=--dry-run
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    PRESET=base; LADDER_FLAG=
  fi
  $PY -c "import torch, deepspeed, megatron.core, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)"
  echo "== attention backends vs explicit (fp32, TF32 off, padded text, every encoder mode)"
  timeout 90 $PY benchmarks/gpu_attention_check.py --preset "$PRESET" || echo "attention check: failed or timed out (exit $?)"
  echo "== step ladder (budget ${BUDGET} s)"
  $PY benchmarks/gpu_ladder.py --out "$OUT" --budget "$BUDGET" $LADDER_FLAG
  date -u +%FT%TZ
} 2>&1 | tee "$OUT/gpu.log"
