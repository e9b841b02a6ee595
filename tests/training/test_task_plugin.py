"""A task defined and registered in this file trains through the launcher at 1 and 2 ranks: the run
config names this module in `plugins`, every rank imports it before the task is looked up.

The toy task is ITC alone on the final CLS states (no VL branch), training the backbone and the ITC
heads; the other heads are frozen (unused, they would still move by weight decay if they trained). Checked against one process: the first step's reported loss of each run
equals this task's forward, in this process, on the global batch the ranks drew (the 2-rank value is
the global ITC over both ranks' rows); the loss falls over the steps at both world sizes; only the
task's own terms are reported; the frozen parameters leave the run as they were built.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import REPO, StartedTorchrun
from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import contrastive_loss
from vlmo_large.tasks.registry import register

LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")
DS = os.path.join(REPO, "ds_configs", "cpu_fp32_zero1.json")
SEED, GLOBAL_BATCH, STEPS = 3, 4, 8


@register
class ItcOnly(Task):
    name = "toy_itc"
    data_kind = "image_text"
    passes = (EncoderPass("image", keep="cls"), EncoderPass("text", keep="cls"))
    terms = ("itc",)
    trainable = (r"backbone\..*", r"itc\..*")
    min_global_batch = 2

    def forward(self, model, batch: dict, ctx: StepContext = StepContext()) -> dict:
        image_pass, text_pass = self.passes
        image = model.backbone.encode_image(batch["image"], image_pass.vl_branch, keep=image_pass.kept(0))
        text = model.backbone.encode_text(batch["text_ids"], batch["text_mask"], text_pass.vl_branch,
                                          text_pass.kept(batch["text_ids"].shape[1]))
        itc, _, _ = contrastive_loss(*model.itc(image[:, 0], text[:, 0]), model.itc.logit_scale, ctx.group)
        return {"loss": itc, "itc": itc}


def _start(out, ranks: int) -> StartedTorchrun:
    return StartedTorchrun([LAUNCHER, "--ds_config", DS, "preset=tiny", "stage=toy_itc",
                            "plugins=[tests.training.test_task_plugin]", f"output_dir={out}", f"seed={SEED}",
                            "data.source=random", "data.random_distinct=1", f"batch.micro={GLOBAL_BATCH // ranks}",
                            f"schedule.steps={STEPS}", "schedule.warmup=1", "optim.lr=3e-4", "log_every=1",
                            "checkpoint.every=0", "tracking_uri=none"], out, nproc=ranks, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_task")
    started = {ranks: _start(folder / f"ranks{ranks}", ranks) for ranks in (1, 2)}  # start-ups overlap
    out = {}
    for ranks, run in started.items():
        run.result()
        with open(folder / f"ranks{ranks}" / "metrics.jsonl") as f:
            out[ranks] = ([json.loads(line) for line in f], folder / f"ranks{ranks}")
    return out


def _first_step_loss_in_this_process(ranks: int) -> float:
    """The toy task's forward on the global batch the launcher's ranks drew (random data of each
    DP rank, concatenated), with the weights the trainer builds from the seed."""
    from vlmo_large.config import get_preset
    from vlmo_large.model import build_model
    from vlmo_large.training.random_batches import RandomBatches

    cfg = get_preset("tiny")
    torch.manual_seed(SEED)
    model = build_model(cfg)
    parts = [next(iter(RandomBatches("image_text", cfg, GLOBAL_BATCH // ranks, SEED, rank, distinct=1)))
             for rank in range(ranks)]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with torch.no_grad():
        return ItcOnly().forward(model, batch)["loss"].item()  # fp32 as the runs (the ITC logits are fp32)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_plugin_task_trains_through_the_launcher(runs, ranks):
    history, out = runs[ranks]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert set(history[0]) == {"step", "loss", "itc"}, "the task's own terms, nothing of stage vl"
    assert history[0]["loss"] == pytest.approx(_first_step_loss_in_this_process(ranks), rel=1e-5)
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.7 * losses[0], losses  # one fixed batch per rank (random_distinct=1): it is learnt


def test_frozen_parameters_leave_the_run_as_built(runs):
    from vlmo_large.config import get_preset
    from vlmo_large.model import build_model
    from vlmo_large.training.freezing import is_trainable

    torch.manual_seed(SEED)
    built = build_model(get_preset("tiny")).state_dict()
    exported = load_file(str(runs[2][1] / "export" / "model.safetensors"))
    common = exported.keys() & built.keys()  # the export's layout may merge tensors kept apart in memory
    frozen = [name for name in common if not is_trainable("toy_itc", name)]
    moved = [name for name in common if not torch.equal(exported[name], built[name])]
    assert any(name.startswith("mlm_head.") for name in frozen) and any(name.startswith("itm_head.") for name in frozen)
    assert moved and not set(moved) & set(frozen), sorted(set(moved) & set(frozen))
