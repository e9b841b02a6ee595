#!/usr/bin/env bash
# GPU check of the training path end to end on one GPU: the launcher with ZeRO-3 + bf16 on the
# synthetic shards (base preset), a checkpoint, --resume auto, the plain export, and to-plain.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
RUN=/tmp/gpu_run
{
  python3 -c "from vlmo_large.data.synthetic import make_synthetic; m = make_synthetic('/tmp/gpu_data', image_size=224); print('data', m['counts'])"
  COMMON="--ds_config ds_configs/zero3_bf16.json preset=base stage=vl output_dir=$RUN tracking_uri=none \
    data.shards=/tmp/gpu_data/image_text/train-{000000..000003}.tar data.tokenizer=/tmp/gpu_data/tokenizer.model \
    data.num_workers=4 batch.micro=32 schedule.warmup=2 log_every=5 checkpoint.every=10 model.vocab_size=1024"
  timeout 200 python3 launchers/pretrain.py $COMMON schedule.steps=20 2>&1 | tr '\r' '\n' | grep -v "^train:" | grep -a "step \|stage\|error\|Error" | tail -8
  echo "== resume from step 20 to 30"
  timeout 150 python3 launchers/pretrain.py $COMMON schedule.steps=30 --resume auto 2>&1 | tr '\r' '\n' | grep -v "^train:" | grep -a "step \|resumed\|error\|Error" | tail -5
  ls $RUN/checkpoints $RUN/export
  echo "== to-plain of the bf16 ZeRO-3 checkpoint vs the export"
  timeout 100 python3 tools/convert_checkpoint.py to-plain $RUN/checkpoints /tmp/gpu_plain 2>&1 | tail -2
  python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/gpu_plain/model.safetensors"); b = load_file("/tmp/gpu_run/export/model.safetensors")
print("tensors", len(a), len(b), "max |plain(fp32 master, as bf16) - export(bf16)|:",
      max((a[k].to(b[k].dtype).float() - b[k].float()).abs().max().item() for k in b))
PY
} 2>&1 | tee "$OUT/train.log"
