"""The built-in demo: synthetic data -> tiny VLMo stage-3 pretraining on the CPU -> held-out retrieval
(-> VQA and NLVR2 fine-tuning).

    python launchers/demo.py [--out runs/demo] [--steps 1000] [--chain] [--finetune]

1. generates the synthetic scenes dataset (tools/make_synthetic.py; reused when present),
2. pretrains the `tiny` preset with ITC + ITM + MLM through DeepSpeed (ds_configs/cpu_fp32_zero0.json)
   and logs to MLflow in <out>/mlflow.db (`--chain` first runs stages 1 and 2 and starts each
   stage from the previous one's weights),
3. reloads the exported plain checkpoint and prints held-out zero-shot retrieval R@1 next to chance,
4. with `--finetune`: fine-tunes the export on the synthetic VQA and NLVR2 sets through the same
   launcher (configs/finetune/tiny_vqa.yaml, tiny_nlvr2.yaml), evaluates each export with
   tools/evaluate.py and prints its accuracy next to the majority-answer baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
warnings.filterwarnings("ignore")

CHAIN_STEPS = {"mim": 150, "text_mlm": 150}  # --chain: the steps of stages 1 and 2 before stage 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "demo"))
    p.add_argument("--steps", type=int, default=1000, help="stage-3 optimizer steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3,
                   help="peak lr of the pretraining (2e-3 leaves ITC on its plateau longer: README)")
    p.add_argument("--chain", action="store_true", help="run stages 1 -> 2 -> 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune", action="store_true", help="then fine-tune VQA and NLVR2 and report their accuracy")
    p.add_argument("--finetune-epochs", type=float, default=None,
                   help="fine-tuning epochs (default: configs/finetune/tiny_<task>.yaml's)")
    return p.parse_args(argv)


def stage_config(args, manifest: dict, stage: str, steps: int, init: str | None) -> dict:
    from vlmo_large.tasks.registry import get_task

    task = get_task(stage)
    kind = task.data_kind
    cfg = {
        "preset": "tiny", "stage": stage, "seed": args.seed, "init": init,
        "output_dir": os.path.join(args.out, stage), "log_every": max(steps // 8, 1),
        # layer scale 1.0 instead of the presets' 0.1: a 4-layer model leaves the initial plateau
        # (all images alike to the ITC heads) within the demo's few hundred steps
        "model": {"layer_scale_init": 1.0},
        "data": {"shards": manifest[kind]["train"], "tokenizer": manifest["tokenizer"], "augment": "light"},
        "batch": {"micro": args.batch},
        "optim": {"lr": args.lr},
        "schedule": {"steps": steps, "warmup": max(steps // 20, 1)},
        "checkpoint": {"every": 0, "keep": 1},
    }
    if task.retrieval:
        cfg["eval_every"] = max(steps // 4, 1)
        cfg["eval"] = {"shards": manifest["image_text"]["val"], "batches": 4,
                       "retrieval_shards": manifest["retrieval"]["shards"],
                       "retrieval_json": manifest["retrieval"]["json"]}
    return cfg


def run_stage(args, manifest: dict, stage: str, steps: int, init: str | None) -> str:
    return launch(args, stage, stage_config(args, manifest, stage, steps, init))


def launch(args, stage: str, cfg: dict) -> str:
    """One launcher run of `cfg` (written beside the run); returns its export folder."""
    from launchers import pretrain

    cfg_path = os.path.join(args.out, f"{stage}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    status = pretrain.main(["--ds_config", os.path.join(REPO, "ds_configs", "cpu_fp32_zero0.json"), "--config", cfg_path])
    if status:
        raise SystemExit(status)
    export = os.path.join(cfg["output_dir"], "export")
    if not os.path.isfile(os.path.join(export, "model.safetensors")):  # a stop request ended it early
        raise SystemExit(f"stage {stage} stopped before its last step: no export in {export}")
    return export


def finetune_config(args, manifest: dict, task: str, init: str) -> dict:
    """configs/finetune/tiny_<task>.yaml with this demo's data and output folders."""
    from vlmo_large.training.run_config import read_mapping

    cfg = read_mapping(os.path.join(REPO, "configs", "finetune", f"tiny_{task}.yaml"))
    cfg.update(init=init, seed=args.seed, output_dir=os.path.join(args.out, task))
    if args.finetune_epochs:
        cfg["schedule"]["epochs"] = args.finetune_epochs
    cfg["data"].update(shards=manifest[task]["train_shards"], tokenizer=manifest["tokenizer"])
    cfg["eval"]["shards"] = manifest[task]["val_shards"]
    if task == "vqa":
        cfg["task"]["answers"] = manifest["vqa"]["answers"]
    return cfg


def majority_baseline(manifest: dict, task: str) -> float:
    """Accuracy on the held-out split of always giving the training split's most frequent answer
    (VQA: scored by the official metric against each question's human answers)."""
    from collections import Counter

    from vlmo_large.evaluation.vqa_metric import vqa_accuracy

    with open(manifest[task]["train"]) as f:
        train = json.load(f)
    with open(manifest[task]["val"]) as f:
        val = json.load(f)
    if task == "vqa":
        answer = Counter(e["answer"] for e in train).most_common(1)[0][0]
        return sum(vqa_accuracy(answer, e["answers"]) for e in val) / len(val)
    label = Counter(bool(e["label"]) for e in train).most_common(1)[0][0]
    return sum(bool(e["label"]) == label for e in val) / len(val)


def finetune_and_report(args, manifest: dict, init: str) -> dict:
    """Fine-tune VQA and NLVR2 from `init`, evaluate each export with tools/evaluate.py (nothing
    but --task and --data: the export carries the rest) and print accuracy against the baseline."""
    from tools.evaluate import main as evaluate

    results = {}
    for task, metric in (("vqa", "vqa_acc"), ("nlvr2", "nlvr2_acc")):
        export = launch(args, task, finetune_config(args, manifest, task, init))
        out = os.path.join(args.out, f"eval_{task}.json")
        if evaluate([export, "--task", task, "--data", manifest[task]["val_shards"], "--out", out]):
            raise SystemExit(2)
        with open(out) as f:
            accuracy = json.load(f)[metric]
        results[task] = {"accuracy": accuracy, "majority_baseline": majority_baseline(manifest, task)}
    for task, r in results.items():
        print(f"{task} held-out accuracy {100 * r['accuracy']:.1f}%  (majority-answer baseline "
              f"{100 * r['majority_baseline']:.1f}%)")
    with open(os.path.join(args.out, "finetune.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report_retrieval(args, manifest: dict, export_dir: str) -> None:
    import torch
    from safetensors.torch import load_file

    from vlmo_large.checkpoint.plain import PlainCheckpoint
    from vlmo_large.data import load_tokenizer
    from vlmo_large.evaluation.heldout_retrieval import heldout_retrieval
    from vlmo_large.formats.rel_pos_tables import split_tables  # the export's merged table -> one per block
    from vlmo_large.model import build_model

    model = build_model(PlainCheckpoint(export_dir).config())
    model.load_state_dict(split_tables(load_file(os.path.join(export_dir, "model.safetensors"))))
    tokenizer = load_tokenizer(manifest["tokenizer"])
    cfg = model.cfg
    torch.manual_seed(0)
    metrics, _ = heldout_retrieval(model, manifest["retrieval"], tokenizer, cfg.image_size, cfg.max_text_len)
    chance = metrics["chance_r1"]
    print(f"held-out retrieval ({round(1 / chance)} images, zero-shot): "
          f"image->text R@1 {100 * metrics['tr_r1']:.1f}%  text->image R@1 {100 * metrics['ir_r1']:.1f}%  "
          f"(chance {100 * chance:.1f}%: {metrics['tr_r1'] / chance:.1f}x and {metrics['ir_r1'] / chance:.1f}x)")
    with open(os.path.join(args.out, "retrieval.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from vlmo_large.data.synthetic import make_synthetic

    start = time.time()
    manifest = make_synthetic(os.path.join(args.out, "data"), seed=args.seed)
    print(f"synthetic dataset ready in {manifest.get('seconds', 0):.1f} s: {manifest['counts']}")
    init = None
    if args.chain:
        for stage in ("mim", "text_mlm"):
            init = run_stage(args, manifest, stage, CHAIN_STEPS[stage], init)
    export_dir = run_stage(args, manifest, "vl", args.steps, init)
    report_retrieval(args, manifest, export_dir)
    if args.finetune:
        finetune_and_report(args, manifest, export_dir)
    print(f"done in {time.time() - start:.0f} s. Plain checkpoint: {export_dir}\n"
          f"MLflow: mlflow ui --backend-store-uri sqlite:///{os.path.join(args.out, 'vl', 'mlflow.db')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
