"""Evaluate any checkpoint this project writes (or a reference VLMo file) on a fine-tuning task.

    python tools/evaluate.py CKPT --task retrieval --data retrieval/shards-{000..001}.tar --json retrieval.json
    python tools/evaluate.py CKPT --task vqa --data vqa/val-{000..003}.tar [--submission answers.json]
    python tools/evaluate.py CKPT --task nlvr2 --data manifest.json          # the synthetic dataset's
    torchrun --nproc_per_node 8 tools/evaluate.py CKPT --task vqa --data ...  # data-parallel over ranks

CKPT: a training export, a plain or sharded folder, a DeepSpeed checkpoint dir, or a reference
VLMo .pt/.pth (--init's sources, training/initialization.py). An export carries its tokenizer, image
preprocessing and task options (VQA answer vocabulary); other sources take --tokenizer, --preset,
--image-size and --answers. `--data`: the split's shards, or a manifest.json of the synthetic
dataset (its held-out split of the task).

retrieval: zero-shot (a pretrained model) or fine-tuned, R@1/5/10 both ways by chunked top-k
(evaluation/topk_retrieval.py), with --rerank-k ITM re-ranking next to it. vqa: the reference's
score and the official VQA accuracy; --submission writes the test-dev JSON [{"question_id",
"answer"}]. nlvr2: accuracy. Prints a table and writes the metrics as JSON (--out). Every problem
a user can fix is one `error: ...` line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from itertools import islice

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|tp_group is None).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

TASKS = ("retrieval", "vqa", "nlvr2")
CHUNK_BATCHES = 32  # batches held on the device at once (the task's metrics are combined over chunks)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="the split's shards (brace pattern) or a synthetic manifest.json")
    p.add_argument("--json", default=None, help="retrieval: the split's captions + gold JSON (retrieval.json)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokenizer", default=None, help="default: the export's")
    p.add_argument("--answers", default=None, help="vqa: the answer vocabulary JSON (default: the export's)")
    p.add_argument("--preset", default=None, help="model preset when the checkpoint has no config (reference files)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--rerank-k", type=int, default=None, help="retrieval: ITM re-ranks each query's top k")
    p.add_argument("--submission", default=None, help="vqa: write the test-dev submission JSON here")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate the first N batches per rank only")
    p.add_argument("--out", default=None, help="metrics JSON (default: eval_<task>.json in the current folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlmo_large.errors import UserError
    try:
        metrics = evaluate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        from vlmo_large.parallel import state
        state.destroy()  # the world and megatron's groups over it together (stale groups break the next run)
    if _rank() == 0:
        out = args.out or f"eval_{args.task}.json"
        with open(out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(table(args.task, metrics) + f"\nmetrics: {out}", flush=True)
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# -- what to evaluate ----------------------------------------------------------------------------
def evaluate(args) -> dict:
    import torch

    from vlmo_large.errors import UserError

    if args.batch < 1:
        raise UserError(f"--batch {args.batch} must be at least 1")
    if not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    data = resolve_data(args)
    _init_distributed()
    export = _export_files(args.checkpoint)
    model, tokenizer = load_for_task(args, export)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    if args.task == "retrieval":
        return retrieval(model, tokenizer, data, args)
    return classification(model, tokenizer, data, args)


def _init_distributed() -> None:
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _export_files(path: str) -> dict:
    """What an export carries besides the weights (checkpoint/plain.py write_export)."""
    from vlmo_large.checkpoint.plain import PREPROCESSING_NAME, TASK_NAME, export_json, export_tokenizer
    if not os.path.isdir(path):
        return {}
    return {"tokenizer": export_tokenizer(path), "preprocessing": export_json(path, PREPROCESSING_NAME),
            "task": export_json(path, TASK_NAME)}


def model_config(args, export: dict):
    """The checkpoint's model config (its config.json, or the DeepSpeed run's), --preset for a file
    without one; the image size and text length of --image-size or the export's preprocessing.json,
    and the task's overrides (NLVR2's third modality row) applied."""
    from vlmo_large.checkpoint.plain import PlainCheckpoint
    from vlmo_large.config import get_preset
    from vlmo_large.errors import UserError
    from vlmo_large.formats.io import CheckpointError
    from vlmo_large.tasks.registry import get_task

    cfg = None
    if args.preset is None and os.path.isdir(args.checkpoint):
        try:
            cfg = PlainCheckpoint(args.checkpoint).config()
        except CheckpointError:  # not a plain folder: a DeepSpeed checkpoint keeps its run's config
            cfg = _deepspeed_config(args.checkpoint)
    if cfg is None:
        if args.preset is None:
            raise UserError(f"{args.checkpoint} carries no model config: name its preset with --preset")
        try:
            cfg = get_preset(args.preset)
        except ValueError as exc:
            raise UserError(f"--preset: {exc}") from exc
    overrides = dict(getattr(get_task(args.task), "model_overrides", None) or {})
    preprocessing = export.get("preprocessing") or {}  # how the export's images and text are prepared
    for key, value in (("image_size", args.image_size or preprocessing.get("image_size")),
                       ("max_text_len", preprocessing.get("max_text_len"))):
        if value:
            overrides[key] = value
    try:
        cfg = cfg.replace(**overrides)
        cfg.validate()
    except ValueError as exc:
        raise UserError(f"model config: {exc}") from exc
    return cfg


def _deepspeed_config(path: str):
    from vlmo_large.checkpoint.convert import open_checkpoint, stored_config
    from vlmo_large.checkpoint.layout import resolve_config
    from vlmo_large.training.initialization import _deepspeed_tag

    found = _deepspeed_tag(path)
    if found is None:
        return None
    ckpt = open_checkpoint(found[0], found[1])
    values, source = stored_config(ckpt)
    return None if values is None else resolve_config(None, None, values, source)


def load_for_task(args, export: dict):
    """(VLMo with the task's heads, the checkpoint's weights loaded; tokenizer)."""
    from vlmo_large.data import load_tokenizer
    from vlmo_large.errors import UserError
    from vlmo_large.model import build_model
    from vlmo_large.tasks.options import TaskOptions
    from vlmo_large.tasks.registry import get_task
    from vlmo_large.training.initialization import load_init_weights

    cfg = model_config(args, export)
    stored = export.get("task") or {}
    options = TaskOptions(**(stored.get("options") or {})) if stored.get("task") == args.task else TaskOptions()
    if args.answers:
        options.answers, options.num_answers = args.answers, None
    if args.rerank_k is not None:
        options.rerank_k = args.rerank_k
    args.options = options
    task = get_task(args.task)
    heads = task.heads(cfg, options)
    model = build_model(cfg, heads=heads)
    report = load_init_weights(model, args.checkpoint)
    absent = sorted({name.split(".")[0] for name in report.missing} & set(heads))
    if absent:
        raise UserError(f"{args.checkpoint} has no {', '.join(absent)}: it is not fine-tuned for '{args.task}' "
                        f"(fine-tune it with launchers/pretrain.py stage={args.task}, or evaluate --task retrieval)")
    if _rank() == 0:
        print(f"loaded {args.checkpoint}: {len(report.loaded)} tensors"
              + (f"; converted: {'; '.join(report.converted)}" if report.converted else ""), flush=True)
    path = args.tokenizer or export.get("tokenizer")
    if not path:
        raise UserError(f"{args.checkpoint} carries no tokenizer: pass --tokenizer")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"--tokenizer {path}: {exc}") from exc
    return model, tokenizer


def resolve_data(args) -> dict:
    """{"shards": ..., "json": ... (retrieval)} from --data / --json, or from a synthetic manifest."""
    from vlmo_large.errors import UserError

    if args.data.endswith(".json"):
        try:
            with open(args.data) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"--data {args.data}: cannot read the manifest ({exc})") from exc
        try:
            if args.task == "retrieval":
                return dict(manifest["retrieval"])
            return {"shards": manifest[args.task]["val_shards"]}
        except (KeyError, TypeError) as exc:
            raise UserError(f"--data {args.data}: no held-out split of task '{args.task}' in the manifest "
                            f"(missing key {exc})") from exc
    if args.task == "retrieval" and not args.json:
        raise UserError("--task retrieval needs --json, the split's captions and gold mapping (retrieval.json)")
    if args.json and not os.path.isfile(args.json):
        raise UserError(f"--json: file not found: {args.json}")
    from vlmo_large.data.shard_list import expand_shards
    try:
        expand_shards(args.data)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"--data: {exc}") from exc
    return {"shards": args.data, "json": args.json}


# -- the tasks ----------------------------------------------------------------------------------
def retrieval(model, tokenizer, data: dict, args) -> dict:
    """R@k both ways over the whole split: each rank encodes its share of the images and captions
    (heldout_retrieval sharded), every rank ranks the gathered features by chunked top-k."""
    from vlmo_large.evaluation.heldout_retrieval import heldout_retrieval

    cfg = model.cfg
    metrics, _ = heldout_retrieval(model, data, tokenizer, cfg.image_size, cfg.max_text_len, batch_size=args.batch,
                                   rerank_k=args.options.rerank_k, sharded=True)
    return {**metrics, "num_images": round(1 / metrics["chance_r1"])}


def classification(model, tokenizer, data: dict, args) -> dict:
    """The task's held-out metrics (Task.heldout_metrics) over every rank's share of the split,
    CHUNK_BATCHES batches at a time; metrics combined over chunks by their question counts."""
    import torch
    import torch.distributed as dist

    from vlmo_large.data import build_loader
    from vlmo_large.data.device_batch import to_device
    from vlmo_large.tasks.registry import get_task

    task, cfg = get_task(args.task), model.cfg
    device = next(model.parameters()).device
    loader = build_loader(task.data_kind, data["shards"], args.batch, tokenizer=tokenizer, image_size=cfg.image_size,
                          max_text_len=cfg.max_text_len, train=False, drop_last=False, pixels="uint8",
                          answers=args.options.answers if args.task == "vqa" else None)
    batches = islice(loader, args.max_batches) if args.max_batches else iter(loader)
    totals, predictions = {}, {}
    while True:
        chunk = [to_device(b, device, torch.float32) for b in islice(batches, CHUNK_BATCHES)]
        if not _any_rank(bool(chunk), device):  # every rank calls the task's collectives as often
            break
        with torch.no_grad():
            _accumulate(totals, task.heldout_metrics(model, chunk))
            if args.submission:
                from vlmo_large.tasks.vqa import vqa_predictions
                predictions.update(vqa_predictions(model, chunk))
    metrics = _combined(totals)
    if args.submission:
        parts = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(parts, predictions)
        else:
            parts = [predictions]
        if _rank() == 0:
            merged = {q: a for part in parts for q, a in part.items()}
            with open(args.submission, "w") as f:
                json.dump([{"question_id": q, "answer": merged[q]} for q in sorted(merged)], f)
            print(f"submission: {len(merged)} answers in {args.submission}", flush=True)
    return metrics


def _any_rank(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def _accumulate(totals: dict, metrics: dict) -> None:
    """Per chunk: the count (the metric named num_*) and each rate times it."""
    count_key = next(k for k in metrics if k.startswith("num_"))
    count = metrics[count_key]
    totals[count_key] = totals.get(count_key, 0) + count
    for key, value in metrics.items():
        if key != count_key:
            totals[key] = totals.get(key, 0.0) + value * count


def _combined(totals: dict) -> dict:
    count_key = next(k for k in totals if k.startswith("num_"))
    count = totals[count_key]
    return {**{k: v / max(count, 1) for k, v in totals.items() if k != count_key}, count_key: int(count)}


def table(task: str, metrics: dict) -> str:
    """Rates as percentages, counts as they are."""
    rows = [f"{task:<16} {'value':>10}"]
    for key, value in metrics.items():
        rows.append(f"{key:<16} " + (f"{100 * value:9.2f}%" if isinstance(value, float) else f"{value:>10}"))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
