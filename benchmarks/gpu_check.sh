#!/usr/bin/env bash
# One prepared GPU check: install the carried wheels (.whl/), check SDPA == explicit on the GPU,
# then time the model, activation checkpointing and the training step. Output goes to $OUT/gpu.log.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONWARNINGS=ignore
# DeepSpeed 0.19.8 cannot parse arch names such as "9.0a" when it JIT-builds FusedAdam
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, deepspeed, megatron.core, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)"
  echo "== SDPA vs explicit attention on the GPU (fp32, padded text, all modes)"
  python3 - <<'PY'
import torch
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from vlmo_large.model import build_model
torch.manual_seed(0)
m = build_model("base", drop_path_rate=0.0).cuda().eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)
B, T = 4, 40
ids = torch.randint(1, 30522, (B, T), device="cuda"); mask = torch.ones_like(ids); mask[1, 20:] = 0; mask[2, 5:] = 0
img = torch.randn(B, 3, 224, 224, device="cuda")
def run(backend):
    for b in m.backbone.blocks: b.attn.backend = backend
    with torch.no_grad():
        i, iv = m.backbone.encode_image(img, vl_branch=True); t, tv = m.backbone.encode_text(ids, mask, vl_branch=True)
        return [i, iv, t, tv, m.backbone.encode_pair(ids, mask, img)]
a, b = run("explicit"), run("sdpa")
print("max |sdpa - explicit| per mode:", [f"{(x - y).abs().max().item():.2e}" for x, y in zip(a, b)])
PY
  echo "== model_bench base bf16 batch 64"
  python3 benchmarks/model_bench.py --preset base --batch 64 --dtype bf16 --rounds 5
  echo "== model_bench base fp32 batch 32"
  python3 benchmarks/model_bench.py --preset base --batch 32 --dtype fp32 --rounds 3
  echo "== model_bench large bf16 batch 32"
  python3 benchmarks/model_bench.py --preset large --batch 32 --dtype bf16 --rounds 3
  echo "== activation checkpointing, base, 64 pairs"
  python3 benchmarks/activation_checkpoint_bench.py --preset base --batch 64
  if [ -f benchmarks/step_bench.py ]; then
    echo "== step_bench"
    timeout 240 python3 benchmarks/step_bench.py --preset base --batch 32 --dtype bf16 --steps 5 --warmup 2 || echo "step_bench failed"
    timeout 150 python3 benchmarks/step_bench.py --preset large --batch 16 --dtype bf16 --steps 4 --warmup 2 || echo "step_bench failed"
  fi
} 2>&1 | tee "$OUT/gpu.log"
