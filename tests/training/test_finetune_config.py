"""The fine-tuning knobs of the run config (issue 14): the task section, epochs counted in samples,
warmup as a ratio, layer-wise lr decay and the head lr multiplier (each parameter's lr against a
table written out by hand), weight-decay exemptions, the task's model overrides, one line per bad
value."""
import math

import pytest
import torch

from vlmo_large.model import build_model
from vlmo_large.tasks.options import TaskOptions
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.optimization import run_param_groups
from vlmo_large.training.run_config import ConfigError, load_run_config
from vlmo_large.training.validation import resolve_run

DS = {"zero_optimization": {"stage": 0}}


def resolve(*overrides, world=1):
    cfg = load_run_config(None, ["data.source=random", "batch.micro=8", *overrides])
    return cfg, resolve_run(cfg, DS, world)


def test_epochs_in_samples_and_warmup_ratio():
    cfg, resolved = resolve("schedule.epochs=2.5", "schedule.epoch_samples=1000", "schedule.warmup_ratio=0.1",
                            "batch.grad_accum=3")
    assert resolved.global_batch == 24
    assert cfg.schedule.steps == math.ceil(2.5 * 1000 / 24) == 105
    assert cfg.schedule.warmup == round(0.1 * 105) == 10
    cfg, _ = resolve()  # neither given: the former defaults
    assert (cfg.schedule.steps, cfg.schedule.warmup) == (1000, 100)
    cfg, _ = resolve("stage=vqa", "task.num_answers=7", "task.rerank_k=3")
    assert cfg.task == TaskOptions(answers=None, num_answers=7, rerank_k=3)


def test_task_model_overrides_apply():
    _, resolved = resolve("stage=nlvr2")
    assert resolved.model.num_modality_types == 3
    _, resolved = resolve("stage=nlvr2", "model.num_modality_types=3")
    assert resolved.model.num_modality_types == 3
    _, resolved = resolve("stage=vqa", "model.image_size=96")
    assert resolved.model.image_size == 96 and resolved.model.num_modality_types == 2


@pytest.mark.parametrize("overrides, message", [
    (["schedule.steps=10", "schedule.epochs=1", "schedule.epoch_samples=100"],
     "schedule.steps=10 and schedule.epochs=1.0 are both set: give the length once, as steps or as epochs"),
    (["schedule.epochs=1"], "schedule.epochs and schedule.epoch_samples are set together"),
    (["schedule.epochs=0", "schedule.epoch_samples=10"], "schedule.epochs=0.0 must be positive"),
    (["schedule.warmup=5", "schedule.warmup_ratio=0.1"],
     "schedule.warmup=5 and schedule.warmup_ratio=0.1 are both set: give the warmup once"),
    (["schedule.warmup_ratio=1.5"], "schedule.warmup_ratio=1.5 must lie in [0, 1]"),
    (["schedule.epochs=1", "schedule.epoch_samples=80", "schedule.warmup=20"],
     "schedule.warmup=20 exceeds schedule.steps=10"),
    (["optim.layer_decay=1.5"], "optim.layer_decay=1.5 must lie in (0, 1] (1 turns it off)"),
    (["optim.head_lr_mult=0"], "optim.head_lr_mult=0.0 must be positive"),
    (["optim.no_decay=gamma"], "config key 'optim.no_decay' must be a list, got str 'gamma'"),
    (["task.rerank_k=-1"], "task.rerank_k=-1 must be >= 0"),
    (["task.num_answers=0"], "task.num_answers=0 must be at least 1"),
    (["task.answers=/nonexistent/answers.json"], "task.answers: file not found: /nonexistent/answers.json"),
    (["task.answer=a.json"], "unknown config key 'task.answer' (known in this section: answers, num_answers, rerank_k)"),
    (["stage=nlvr2", "model.num_modality_types=2"],
     "model.num_modality_types=2 conflicts with stage 'nlvr2', which needs num_modality_types=3"),
])
def test_bad_values_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve(*overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_layer_decay_and_head_multiplier_lrs():
    """tiny: 4 blocks. Each parameter's group lr against the table: block i at lr * 0.5^(4 - i),
    the embeddings at lr * 0.5^5, the final norm / pooler / pretraining heads at lr, the VQA
    classifier at lr * 20; weight decay by the reference rule plus the `no_decay` glob."""
    cfg, resolved = resolve("stage=vqa", "task.num_answers=5", "optim.lr=1e-3", "optim.layer_decay=0.5",
                            "optim.head_lr_mult=20", "optim.no_decay=['*.gamma_*']")
    heads = get_task("vqa").heads(resolved.model, cfg.task)
    model = build_model(resolved.model, heads=heads)
    groups = run_param_groups(model, cfg.optim, resolved.model.depth, tuple(heads))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    table = {
        "backbone.patch_embed.proj.weight": 1e-3 * 0.5 ** 5,
        "backbone.patch_embed.cls_token": 1e-3 * 0.5 ** 5,
        "backbone.text_embeddings.word_embeddings.weight": 1e-3 * 0.5 ** 5,
        "backbone.modality_embed.weight": 1e-3 * 0.5 ** 5,
        "backbone.blocks.0.attn.qkv.weight": 1e-3 * 0.5 ** 4,
        "backbone.blocks.0.rel_pos.table": 1e-3 * 0.5 ** 4,
        "backbone.blocks.1.norm1.weight": 1e-3 * 0.5 ** 3,
        "backbone.blocks.2.experts.vl.fc1.weight": 1e-3 * 0.5 ** 2,
        "backbone.blocks.3.gamma_2": 1e-3 * 0.5 ** 1,
        "backbone.norm.weight": 1e-3,
        "pooler.dense.weight": 1e-3,
        "itm_head.weight": 1e-3,
        "vqa_classifier.0.weight": 1e-3 * 20,
        "vqa_classifier.3.bias": 1e-3 * 20,
    }
    params = dict(model.named_parameters())
    for name, lr in table.items():
        assert lr_of[id(params[name])] == pytest.approx(lr, rel=1e-12), name
    assert len(lr_of) == len(params)  # every parameter in exactly one group
    assert decay_of[id(params["backbone.blocks.3.gamma_2"])] == 0.0  # the no_decay glob
    assert decay_of[id(params["backbone.blocks.1.attn.qkv.weight"])] == cfg.optim.weight_decay
    assert decay_of[id(params["backbone.blocks.1.attn.proj.bias"])] == 0.0  # the reference rule
    assert decay_of[id(params["vqa_classifier.0.weight"])] == cfg.optim.weight_decay


def test_without_knobs_two_groups_at_the_run_lr():
    """Layer decay off and no head multiplier: the decay / no_decay groups, no per-group lr."""
    cfg, resolved = resolve("stage=vqa", "task.num_answers=5", "optim.head_lr_mult=1")
    model = build_model(resolved.model, heads=get_task("vqa").heads(resolved.model, cfg.task))
    groups = run_param_groups(model, cfg.optim, resolved.model.depth, ("vqa_classifier",))
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and all("lr" not in g for g in groups)


def test_the_engine_steps_each_group_at_its_lr(tmp_path):
    """Through DeepSpeed: after warmup the optimizer's groups hold lr * multiplier, scheduled alike."""
    from vlmo_large.training.trainer import Trainer

    cfg = load_run_config(None, ["data.source=random", "batch.micro=2", "stage=vqa", "task.num_answers=5",
                                 "schedule.steps=4", "schedule.warmup=0", "optim.lr=1e-3", "optim.layer_decay=0.5",
                                 "optim.head_lr_mult=20", f"output_dir={tmp_path}", "checkpoint.export=false",
                                 "tracking_uri=none"])
    trainer = Trainer(cfg, resolve_run(cfg, DS, 1))
    trainer.setup()
    lrs = {g["name"]: g["lr"] for g in trainer.engine.optimizer.param_groups}
    assert lrs["decay@lr_x20"] == pytest.approx(2e-2) and lrs["decay"] == pytest.approx(1e-3)
    assert lrs["decay@lr_x0.03125"] == pytest.approx(1e-3 * 0.5 ** 5)
    assert torch.is_tensor(trainer.model.vqa_classifier[0].weight)
