"""The training loop (a pretraining stage or a fine-tuning task): build, (re)start, step, log, evaluate,
checkpoint, export.

    result = Trainer(cfg, resolved, tracker=tracker, evaluate=evaluate).run()

`tracker` needs log_metrics(dict, step) and log_artifact(path) (the launcher logs the config);
`evaluate` is called as evaluate(model, step=..., engine=...) on every rank and returns a dict of
metrics. Rank 0 appends each step to <output_dir>/metrics.jsonl as it goes (metrics_file.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from vlmo_large.checkpoint.plain import CONFIG_NAME, ExportExtras
from vlmo_large.errors import UserError
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model import build_model
from vlmo_large.parallel import state
from vlmo_large.parallel.parallelize import parallelize, plan_from_config
from vlmo_large.tasks.registry import get_task
from vlmo_large.tasks.vqa import classifier_answers
from vlmo_large.training import checkpointing, preemption
from vlmo_large.training.engine import build_engine, is_zero3, model_dtype
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.initialization import load_init_weights
from vlmo_large.training.metrics_file import MetricsFile
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.progress import Progress
from vlmo_large.training.random_batches import RandomBatches
from vlmo_large.training.run_config import RunConfig
from vlmo_large.training.step_flops import peak_tflops, step_flops
from vlmo_large.training.validation import ResolvedRun


class NullTracker:
    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass


def build_batches(cfg: RunConfig, resolved: ResolvedRun):
    kind, model_cfg, data = get_task(cfg.stage).data_kind, resolved.model, cfg.data
    if data.source == "random":
        extra = {"num_answers": classifier_answers(cfg.task)[0]} if kind == "vqa" else {}  # the classifier's width
        return RandomBatches(kind, model_cfg, resolved.micro, cfg.seed, state.dp_rank(), data.mlm_prob, data.mim_ratio,
                             data.random_distinct, **extra)
    from vlmo_large.data import build_loader, load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else None
    return build_loader(kind, data.shards, resolved.micro, tokenizer=tokenizer, image_size=model_cfg.image_size,
                        max_text_len=model_cfg.max_text_len, rank=state.dp_rank(), world_size=state.dp_size(),
                        num_workers=data.num_workers, seed=cfg.seed, mlm_prob=data.mlm_prob,
                        mim_ratio=data.mim_ratio, patch_size=model_cfg.patch_size, augment=data.augment,
                        pixels="uint8", pin_memory=torch.cuda.is_available(),  # to_device normalises
                        answers=cfg.task.answers if kind == "vqa" else None)


def endless(loader):
    """Batches across epochs (the loader moves itself to the next epoch when one ends)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data loader produced no batch in a whole epoch (too few samples for the batch size?)")


def mean_over_data_parallel(sums: dict, count: int, flag: Optional[bool] = None):
    """Per-rank sums of `count` values each -> the global mean of every term (one all-reduce).

    With `flag` (this rank's yes/no) the same all-reduce also says whether any rank said yes:
    returns (means, any_flag) instead of the means alone."""
    names = sorted(sums)
    values = [sums[k] / count for k in names]
    if flag is not None:
        values.append(torch.tensor(float(flag), device=values[0].device if values else None))
    if not values:
        return {}
    values = torch.stack([v.reshape(()) for v in values])
    dist.all_reduce(values, group=state.dp_group())
    host = values.tolist()  # the one host transfer of the step
    means = dict(zip(names, (v / state.dp_size() for v in host)))
    return means if flag is None else (means, host[-1] > 0)


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """The batch on the device; uint8 images normalised there (data/device_batch.py)."""
    from vlmo_large.data.device_batch import to_device as batch_to_device
    return batch_to_device(batch, device, dtype)


class Trainer:
    def __init__(self, cfg: RunConfig, resolved: ResolvedRun, tracker=None,
                 evaluate: Optional[Callable] = None):
        self.cfg, self.resolved = cfg, resolved
        self.tracker = tracker or NullTracker()
        self.evaluate = evaluate
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.output_dir, "checkpoints")
        self.stopped_by: Optional[str] = None  # set when a stop request (preemption.py) ended the run early
        self._stop_vote: Optional[bool] = None  # any rank's stop request, from train_step's all-reduce

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        state.ensure_initialized(cfg.parallel.tp, cfg.parallel.pp)
        self.rank = dist.get_rank()
        self.build_model()
        self.objective = TaskObjective(self.model, cfg.stage, cfg.loss, state.dp_group(), cfg.seed, cfg.data.mlm_prob)
        self.engine = build_engine(self.objective, self.resolved, cfg, self.head_names)
        self.restore()

    def build_model(self) -> None:
        """VLMo from the seed or `init`, with this stage's freezing (notes for the progress output)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (TP layers split a master)
        heads = get_task(cfg.stage).heads(self.resolved.model, cfg.task)  # a fine-tuning task's new modules
        self.head_names = tuple(heads)
        self.model = self.new_model(heads)
        self.progress_note = []
        if cfg.init:
            report = load_init_weights(self.model, cfg.init)
            self.progress_note.append(f"init from {cfg.init}: loaded {len(report.loaded)}, missing (new) "
                                      f"{len(report.missing)}, unused {len(report.unexpected)}")
            self.progress_note += [f"  new: {_grouped(report.missing)}"] if report.missing else []
            self.progress_note += [f"  unused: {_grouped(report.unexpected)}"] if report.unexpected else []
            self.progress_note += [f"  converted: {'; '.join(report.converted)}"] if report.converted else []
        trainable, frozen = apply_stage_freezing(self.model, cfg.stage)
        # checkpointing, attention backend, regional compile: once, here, before the engine wraps it
        parallelize(self.model, plan_from_config(self.resolved.model))
        self.progress_note.append(f"stage {cfg.stage}: {trainable:,} trainable, {frozen:,} frozen parameters "
                                  f"(per TP rank); global batch {self.resolved.global_batch}")

    def new_model(self, heads: dict):
        """VLMo with the task's heads, initialised from the seed just set (the groups exist: setup)."""
        return build_model(self.resolved.model, tp_group=state.tp_group(), heads=heads)

    def restore(self) -> None:
        """The data loader, and the engine, step and data position of `resume` if set."""
        cfg = self.cfg
        self.loader = build_batches(cfg, self.resolved)
        self.step = 0
        if cfg.resume:
            restored = checkpointing.resume(self.engine, self.ckpt_dir if cfg.resume == "auto" else cfg.resume)
            if restored is None:
                self.progress_note.append(f"resume: no complete checkpoint under {self.ckpt_dir}, starting fresh")
            else:
                self.step = restored["step"]
                self.loader.load_state_dict(restored["data_state"])
                self.progress_note += [f"resume: skipped {_skipped_text(s)}" for s in restored.get("skipped") or ()]
                self.progress_note += list(restored.get("notes") or ())  # e.g. a ZeRO-0 run on another DP size
                self.progress_note.append(f"resumed from {restored['tag']} at step {self.step}")

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        sums = {}
        dtype, accum = model_dtype(self.engine), self.resolved.grad_accum
        self.step_flops = 0.0
        for _ in range(accum):
            batch = next(batches)
            self.step_flops += self._micro_batch_flops(batch)  # from the host batch: no device read
            out = self.engine(to_device(batch, self.engine.device, dtype), self.step)
            self.engine.backward(out["loss"])
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        if state.dp_size() != dist.get_world_size():  # TP: the DP all-reduce does not reach every rank
            return mean_over_data_parallel(sums, accum)
        metrics, self._stop_vote = mean_over_data_parallel(sums, accum, preemption.requested() is not None)
        return metrics

    def _micro_batch_flops(self, batch: dict) -> float:
        """This GPU's useful FLOPs of one micro-batch (step_flops.py; a TP rank does 1/tp of them)."""
        return step_flops(self.resolved.model, self.cfg.stage, batch, state.dp_size()) / state.tp_size()

    def _perf_metrics(self, elapsed: float) -> dict:
        """perf/tflops_per_gpu of the last step, and perf/mfu where the card's peak is known (none
        from a train_step that does not count FLOPs: the pipeline's)."""
        if getattr(self, "step_flops", None) is None:
            return {}
        if not hasattr(self, "_peak"):
            device = torch.device(self.engine.device)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            self._peak = peak_tflops(name, str(model_dtype(self.engine)))
        tflops = self.step_flops / elapsed / 1e12
        return {"perf/tflops_per_gpu": tflops, **({"perf/mfu": tflops / self._peak} if self._peak else {})}

    def _agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop: folded into train_step's all-reduce where that one
        spans every rank, else one all-reduce of a flag (pipeline, TP)."""
        vote, self._stop_vote = self._stop_vote, None
        if vote is None:
            flag = torch.tensor([1.0 if preemption.requested() else 0.0], device=self.engine.device)
            dist.all_reduce(flag)
            vote = flag.item() > 0
        return vote

    def _skip_counts(self) -> dict:
        """Bad samples the data pipeline skipped so far, by reason (summed over its workers)."""
        counts = getattr(self.loader, "skip_counts", None)
        return dict(counts()) if counts else {}

    def _data_state(self) -> dict:
        return self.loader.state_dict()

    def save(self, extra: Optional[dict] = None) -> None:
        previous = checkpointing.complete_tags(self.ckpt_dir)
        try:
            checkpointing.save(self.engine, self.ckpt_dir, self.step, self._data_state(), self.cfg.checkpoint.keep,
                               extra={"run_config": self.cfg.to_dict(), **(extra or {})})
        except (OSError, RuntimeError) as exc:
            if not _is_write_failure(exc):
                raise
            # the tag being written has no COMPLETE marker: resume never picks it, the next save deletes it
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            folder = os.path.join(self.ckpt_dir, checkpointing.tag_for(self.step))
            raise CheckpointError(f"step {self.step}: writing checkpoint {folder} failed ({_first_line(exc)}); "
                                  f"{kept} and --resume auto continues from it") from exc

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop_at: Optional[int] = None) -> list[dict]:
        """Train to schedule.steps; `stop_at` ends early after that step with a checkpoint, as a job
        whose time allocation ran out (the schedule still spans schedule.steps). A stop request
        (SIGTERM/SIGUSR1 once the launcher installed preemption.py's handler) ends the run the same
        way at the next step boundary, with `stopped_by` set. A non-finite loss is a UserError
        naming the step."""
        started = time.perf_counter()
        self.setup()
        cfg, total = self.cfg, self.cfg.schedule.steps
        end = total if stop_at is None else min(stop_at, total)
        progress = Progress(total, self.step, self.rank == 0, cfg.log_every)
        for line in self.progress_note:
            progress.write(line)
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        metrics_file = MetricsFile(metrics_path, self.step) if self.rank == 0 else None
        history, batches, last_saved, first_step, step_time = [], endless(self.loader), None, self.step, 0.0
        self.history = history  # the last entry's terms go into the export's model card
        try:
            while self.step < end:
                start = time.perf_counter()
                metrics = self.train_step(batches)
                stop = self._agree_to_stop()
                self.step += 1
                elapsed = time.perf_counter() - start
                step_time += elapsed
                samples_per_s = self.resolved.global_batch / elapsed
                lr = self.engine.get_lr()[0]
                skipped = {f"data/skipped_{k}": v for k, v in self._skip_counts().items() if v}
                history.append({"step": self.step, **metrics})
                if metrics_file:
                    metrics_file.append({"step": self.step, **metrics, **skipped})
                self._check_finite(metrics)
                progress.update(self.step, metrics, samples_per_s, lr, self._skip_counts())
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == total):
                    self.tracker.log_metrics({**metrics, **skipped, "lr": lr, "samples_per_s": samples_per_s,
                                              **self._perf_metrics(elapsed)}, self.step)
                if self.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._evaluate(progress)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                    last_saved = self.step
                if stop:
                    self.stopped_by = preemption.requested() or "a signal to another rank"
                    break
            if last_saved != self.step:
                self.save()
        finally:
            if metrics_file:
                metrics_file.close()
            progress.close()
        if self.stopped_by:
            progress.write(f"stopped at step {self.step} on {self.stopped_by}: checkpoint "
                           f"{checkpointing.tag_for(self.step)} written; continue with --resume auto")
        trained = self.step - first_step
        if self.rank == 0:
            self.tracker.log_metrics({"run/total_time_s": time.perf_counter() - started,
                                      "run/mean_samples_per_s": trained * self.resolved.global_batch / step_time
                                      if step_time else 0.0}, self.step)
        self._finish(export=self.step == total)
        return history

    def _check_finite(self, metrics: dict) -> None:
        """Every rank holds the same all-reduced values, so every rank stops here together."""
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            names = ", ".join(f"{k}={v}" for k, v in bad.items())
            ckpt = checkpointing.complete_tags(self.ckpt_dir)
            raise UserError(f"step {self.step}: non-finite loss ({names}), training diverged; lower optim.lr or "
                            f"raise schedule.warmup" + (f" (last checkpoint: {ckpt[-1]})" if ckpt else ""))

    def _evaluate(self, progress: Progress) -> None:
        self.engine.eval()
        with torch.no_grad():
            results = self.evaluate(self.model, step=self.step, engine=self.engine) or {}
        self.engine.train()
        self.last_eval = {f"eval/{k}": v for k, v in results.items()}
        if self.rank == 0 and results:
            self.tracker.log_metrics(self.last_eval, self.step)
            progress.write(f"eval step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))

    def export(self, out_dir: str) -> None:
        checkpointing.export_weights(self.engine, self.model, out_dir, is_zero3(self.engine), self.export_extras())

    def export_extras(self, metrics: Optional[dict] = None) -> ExportExtras:
        """The tokenizer, task and model-card facts written with the export (checkpoint/plain.py)."""
        cfg = self.cfg
        final = {**(self.history[-1] if getattr(self, "history", None) else {}), **getattr(self, "last_eval", {})}
        final.pop("step", None)
        return ExportExtras(tokenizer=cfg.data.tokenizer, task=cfg.stage, task_options=dataclasses.asdict(cfg.task),
                            card={"init": cfg.init, "data": cfg.data.shards, "steps": self.step,
                                  "global_batch": self.resolved.global_batch, "metrics": metrics or final})

    def _finish(self, export: bool) -> None:
        cfg = self.cfg
        export = export and cfg.checkpoint.export
        if export:
            self.export(os.path.join(cfg.output_dir, "export"))
        if self.rank == 0:
            self.tracker.log_artifact(os.path.join(cfg.output_dir, "metrics.jsonl"))
            if export:
                self.tracker.log_artifact(os.path.join(cfg.output_dir, "export", CONFIG_NAME))


def _grouped(names: list[str]) -> str:
    """Tensor names summed up by module ("vqa_classifier (4 tensors), itm_head (2 tensors)")."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[0] == "backbone" and parts[1] == "blocks" else parts[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n} tensor{'s' if n > 1 else ''})" for k, n in counts.items())


def _skipped_text(item) -> str:
    """One entry of checkpointing.resume's `skipped` list: a tag with its reason, in any plain shape."""
    if isinstance(item, dict):
        return f"{item.get('tag', '?')} ({item.get('reason', 'unreadable')})"
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return f"{item[0]} ({item[1]})"
    return str(item)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_write_failure(exc: BaseException) -> bool:
    """OSError (ENOSPC, EDQUOT, EIO...) or torch.save's RuntimeError for a failed file write (on a
    full disk its zip writer reports "unexpected pos N vs M")."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("unexpected pos", "write", "iostream error", "no space", "disk quota"))
