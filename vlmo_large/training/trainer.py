"""The pretraining loop: build, (re)start, step, log, evaluate, checkpoint, export.

    result = Trainer(cfg, resolved, tracker=tracker, evaluate=evaluate).run()

`tracker` needs log_params(dict), log_metrics(dict, step), log_artifact(path); `evaluate` is
called as evaluate(model, step=..., engine=...) on every rank and returns a dict of metrics.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from vlmo_large.model import build_model
from vlmo_large.parallel import state
from vlmo_large.training import checkpointing
from vlmo_large.training.engine import build_engine, is_zero3, model_dtype
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.initialization import load_init_weights
from vlmo_large.training.objectives import DATA_KIND, LossWeights, PretrainingObjective
from vlmo_large.training.progress import Progress
from vlmo_large.training.random_batches import RandomBatches
from vlmo_large.training.run_config import RunConfig
from vlmo_large.training.validation import ResolvedRun


class NullTracker:
    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass


def build_batches(cfg: RunConfig, resolved: ResolvedRun):
    kind, model_cfg, data = DATA_KIND[cfg.stage], resolved.model, cfg.data
    if data.source == "random":
        return RandomBatches(kind, model_cfg, resolved.micro, cfg.seed, state.dp_rank(), data.mlm_prob, data.mim_ratio,
                             data.random_distinct)
    from vlmo_large.data import build_loader, load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else None
    return build_loader(kind, data.shards, resolved.micro, tokenizer=tokenizer, image_size=model_cfg.image_size,
                        max_text_len=model_cfg.max_text_len, rank=state.dp_rank(), world_size=state.dp_size(),
                        num_workers=data.num_workers, seed=cfg.seed, mlm_prob=data.mlm_prob,
                        mim_ratio=data.mim_ratio, patch_size=model_cfg.patch_size, augment=data.augment)


def endless(loader):
    """Batches across epochs (the loader moves itself to the next epoch when one ends)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data loader produced no batch in a whole epoch (too few samples for the batch size?)")


def mean_over_data_parallel(sums: dict, count: int) -> dict:
    """Per-rank sums of `count` values each -> the global mean of every term (one all-reduce)."""
    if not sums:
        return {}
    names = sorted(sums)
    values = torch.stack([sums[k] for k in names]) / count
    dist.all_reduce(values, group=state.dp_group())
    return dict(zip(names, (values / state.dp_size()).tolist()))


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: RunConfig, resolved: ResolvedRun, tracker=None,
                 evaluate: Optional[Callable] = None):
        self.cfg, self.resolved = cfg, resolved
        self.tracker = tracker or NullTracker()
        self.evaluate = evaluate
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.output_dir, "checkpoints")

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        state.ensure_initialized(cfg.parallel.tp, cfg.parallel.pp)
        self.rank = dist.get_rank()
        self.build_model()
        weights = LossWeights(cfg.loss.itc, cfg.loss.itm, cfg.loss.mlm)
        self.objective = PretrainingObjective(self.model, cfg.stage, weights, state.dp_group(), cfg.seed)
        self.engine = build_engine(self.objective, self.resolved, cfg)
        self.restore()

    def build_model(self) -> None:
        """VLMo from the seed or `init`, with this stage's freezing (notes for the progress output)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (TP layers split a master)
        self.model = build_model(self.resolved.model)
        self.progress_note = []
        if cfg.init:
            report = load_init_weights(self.model, cfg.init)
            self.progress_note.append(f"init from {cfg.init}: loaded {len(report.loaded)}, missing (new) "
                                      f"{len(report.missing)}, unused {len(report.unexpected)}")
            self.progress_note += [f"  new: {', '.join(report.missing)}"] if report.missing else []
        trainable, frozen = apply_stage_freezing(self.model, cfg.stage)
        self.progress_note.append(f"stage {cfg.stage}: {trainable:,} trainable, {frozen:,} frozen parameters "
                                  f"(per TP rank); global batch {self.resolved.global_batch}")

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
                self.progress_note.append(f"resumed from {restored['tag']} at step {self.step}")

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        sums = {}
        dtype, accum = model_dtype(self.engine), self.resolved.grad_accum
        for _ in range(accum):
            out = self.engine(to_device(next(batches), self.engine.device, dtype), self.step)
            self.engine.backward(out["loss"])
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        return mean_over_data_parallel(sums, accum)

    def _skip_counts(self) -> dict:
        """Bad samples the data pipeline skipped so far, by reason (summed over its workers)."""
        counts = getattr(self.loader, "skip_counts", None)
        return dict(counts()) if counts else {}

    def _data_state(self) -> dict:
        return self.loader.state_dict()

    def save(self, extra: Optional[dict] = None) -> None:
        checkpointing.save(self.engine, self.ckpt_dir, self.step, self._data_state(), self.cfg.checkpoint.keep,
                           extra={"run_config": self.cfg.to_dict(), **(extra or {})})

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop_at: Optional[int] = None) -> list[dict]:
        """Train to schedule.steps; `stop_at` ends early after that step with a checkpoint, as a job
        whose time allocation ran out (the schedule still spans schedule.steps)."""
        self.setup()
        cfg, total = self.cfg, self.cfg.schedule.steps
        end = total if stop_at is None else min(stop_at, total)
        progress = Progress(total, self.step, self.rank == 0, cfg.log_every)
        for line in self.progress_note:
            progress.write(line)
        if self.rank == 0:
            self.tracker.log_params(cfg.to_dict())
        history, batches, last_saved = [], endless(self.loader), None
        while self.step < end:
            start = time.perf_counter()
            metrics = self.train_step(batches)
            self.step += 1
            samples_per_s = self.resolved.global_batch / (time.perf_counter() - start)
            lr = self.engine.get_lr()[0]
            history.append({"step": self.step, **metrics})
            progress.update(self.step, metrics, samples_per_s, lr)
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == total):
                skipped = {f"data/skipped_{k}": v for k, v in self._skip_counts().items()}
                self.tracker.log_metrics({**metrics, **skipped, "lr": lr, "samples_per_s": samples_per_s}, self.step)
            if self.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate(progress)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
                last_saved = self.step
        if last_saved != self.step:
            self.save()
        progress.close()
        self._finish(history, export=self.step == total)
        return history

    def _evaluate(self, progress: Progress) -> None:
        self.engine.eval()
        with torch.no_grad():
            results = self.evaluate(self.model, step=self.step, engine=self.engine) or {}
        self.engine.train()
        if self.rank == 0 and results:
            self.tracker.log_metrics({f"eval/{k}": v for k, v in results.items()}, self.step)
            progress.write(f"eval step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))

    def export(self, out_dir: str) -> None:
        checkpointing.export_weights(self.engine, self.model, out_dir, is_zero3(self.engine))

    def _finish(self, history: list[dict], export: bool) -> None:
        cfg = self.cfg
        export = export and cfg.checkpoint.export
        if export:
            self.export(os.path.join(cfg.output_dir, "export"))
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            path = os.path.join(cfg.output_dir, "metrics.jsonl")
            with open(path, "a") as f:
                f.writelines(json.dumps(h) + "\n" for h in history)
            self.tracker.log_artifact(path)
            if export:
                self.tracker.log_artifact(os.path.join(cfg.output_dir, "export", "model_config.json"))
