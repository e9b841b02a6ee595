"""Fine-tuning through the launcher (one process): VQA from a pretrained export given as --init,
the new classifier reported, the loss falling over a few steps, and the run's export evaluated by
tools/evaluate.py with nothing but --task and --data."""
import json
import os
import subprocess
import sys

import torch

from tests.conftest import randomize_
from tests.training.conftest import REPO
from tools.evaluate import main as evaluate_main
from vlmo_large.checkpoint.plain import export_tokenizer, write_export
from vlmo_large.config import get_preset
from vlmo_large.model import build_model


def test_vqa_finetune_from_an_export_then_evaluate(dataset, tmp_path):
    cfg = get_preset("tiny", vocab_size=1000)
    torch.manual_seed(0)
    write_export(str(tmp_path / "pretrained"), randomize_(build_model(cfg)).state_dict(), cfg)
    out = tmp_path / "vqa"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--ds_config",
         os.path.join(REPO, "ds_configs", "cpu_fp32_zero0.json"), "--config",
         os.path.join(REPO, "configs", "finetune", "tiny_vqa.yaml"), "--init", str(tmp_path / "pretrained"),
         f"output_dir={out}", "tracking_uri=none", "model.vocab_size=1000", f"data.tokenizer={dataset['tokenizer']}",
         f"data.shards={dataset['vqa']['train_shards']}", f"task.answers={dataset['vqa']['answers']}",
         f"eval.shards={dataset['vqa']['val_shards']}", "eval_every=8", "eval.batches=1", "batch.micro=2",
         "batch.grad_accum=2",
         "schedule.epochs=null", "schedule.epoch_samples=null", "schedule.steps=8", "schedule.warmup_ratio=null",
         "schedule.warmup=0", "optim.head_lr_mult=20", "log_every=1"],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new: vqa_classifier (6 tensors)" in result.stdout, result.stdout
    assert "eval step 8: loss=" in result.stdout and "vqa_acc=" in result.stdout  # held-out, with the vocabulary
    step1 = next(line for line in result.stdout.splitlines() if line.startswith("step 1/8"))
    assert "lr=8.750e-04" in step1  # the run's lr reported (1e-3, linear decay over 8 steps), not the head's 20x
    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.7 * losses[0], losses
    export = out / "export"
    assert export_tokenizer(str(export)) and (export / "answers.json").is_file()
    assert "| loss |" in (export / "MODEL_CARD.md").read_text()
    metrics_path = tmp_path / "eval.json"
    assert evaluate_main([str(export), "--task", "vqa", "--data", dataset["vqa"]["val_shards"],
                          "--out", str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    with open(dataset["vqa"]["val"]) as f:
        assert metrics["num_questions"] == len(json.load(f))
    assert 0.0 <= metrics["vqa_acc"] <= 1.0
