"""A model built without a tensor-parallel group touches no process-group state (issue 13, item 3).

Each check runs in a fresh interpreter: one that already imported or initialised something in this
pytest process would hide a side effect.
"""
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

UNTOUCHED = """
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import layers, mappings
import torch

def assert_untouched(what):
    assert not dist.is_initialized(), f"{what} initialised torch.distributed"
    assert not parallel_state.model_parallel_is_initialized(), f"{what} created megatron's model-parallel groups"
    assert layers.torch is torch and mappings.torch is torch, f"{what} patched megatron's module globals"
"""

TINY_FORWARD = UNTOUCHED + """
from vlmo_large.model import build_model
from vlmo_large.parallel.parallelize import parallelize, plan_from_config
from vlmo_large.tasks.losses import mlm_loss

torch.manual_seed(0)
model = build_model("tiny")
parallelize(model, plan_from_config(model.cfg))
cfg, bb = model.cfg, model.backbone
ids = torch.randint(1, cfg.vocab_size, (2, cfg.max_text_len))
mask = torch.ones_like(ids)
images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
pair = bb.encode_pair(ids, mask, images)
loss = mlm_loss(model.mlm_head, pair[:, : ids.shape[1]], labels) + bb.encode_image(images).square().mean()
loss.backward()
assert torch.isfinite(loss)
assert_untouched("build_model('tiny') + forward/backward + mlm_loss")

# the same weights as a build with an explicit one-rank group, as the trainer passes it
from vlmo_large.parallel import state
torch.manual_seed(0)
plain = build_model("tiny").state_dict()
state.ensure_initialized(1, 1)
torch.manual_seed(0)
grouped = build_model("tiny", tp_group=state.tp_group()).state_dict()
assert list(plain) == list(grouped), sorted(set(plain) ^ set(grouped))
for name in plain:
    assert torch.equal(plain[name], grouped[name]), name
state.destroy()
print("OK")
"""

BASE_BUILD = UNTOUCHED + """
from vlmo_large.model import build_model
build_model("base")
assert_untouched("build_model('base')")
print("OK")
"""


def _run_fresh(code: str) -> None:
    env = dict(os.environ, PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # a plain process, not a launched rank
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout[-2000:] + result.stderr[-4000:]


def test_tiny_model_runs_without_distributed_and_equals_a_one_rank_group_build():
    _run_fresh(TINY_FORWARD)


def test_building_base_leaves_torch_distributed_uninitialised():
    _run_fresh(BASE_BUILD)
