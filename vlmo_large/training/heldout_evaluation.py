"""Evaluation during training on held-out data: the task's loss terms on `eval.shards` and what the
task adds (Task.heldout_metrics; stage vl: zero-shot retrieval R@1/R@5 both ways, ITM accuracy and
MLM accuracy), plus, for a task with `retrieval`, held-out retrieval and a retrieval-examples figure
when a retrieval split (images + captions JSON) is configured.

Every rank calls it (the metrics are collectives over the data-parallel group). With pipeline
parallelism the loss terms and the task's metrics go through the pipeline: PipelineStep.evaluate
and PipelineStep.heldout_parts compute them on the last stage (Task.score, Task.heldout_batch) and
send them to the others, where the loss terms are averaged and the metrics reduced
(Task.heldout_reduce) over data parallel as in one process. A task whose metrics are not in those
pieces (a plugin that implements heldout_metrics alone) and the held-out retrieval over
`eval.retrieval_json` (heldout_retrieval, the whole model in one process) are left out at PP.
"""
from __future__ import annotations

from itertools import islice

import torch
import torch.distributed as dist

from vlmo_large.parallel import state
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.run_config import RunConfig
from vlmo_large.training.validation import ResolvedRun


class HeldOutEvaluator:
    def __init__(self, cfg: RunConfig, resolved: ResolvedRun, tracker=None):
        self.cfg, self.resolved, self.tracker = cfg, resolved, tracker
        self.task = get_task(cfg.stage)
        self.tokenizer = None
        if cfg.data.tokenizer:
            from vlmo_large.data import load_tokenizer
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)

    def _batches(self, engine):
        from vlmo_large.data import build_loader
        from vlmo_large.training.engine import model_dtype
        from vlmo_large.training.trainer import to_device

        cfg, model_cfg = self.cfg, self.resolved.model
        loader = build_loader(self.task.data_kind, cfg.eval.shards, self.resolved.micro, tokenizer=self.tokenizer,
                              image_size=model_cfg.image_size, max_text_len=model_cfg.max_text_len, train=False,
                              rank=state.dp_rank(), world_size=state.dp_size(), seed=cfg.seed,
                              mlm_prob=cfg.data.mlm_prob, mim_ratio=cfg.data.mim_ratio,
                              patch_size=model_cfg.patch_size, pixels="uint8",  # to_device normalises
                              answers=cfg.task.answers if self.task.data_kind == "vqa" else None)
        dtype = model_dtype(engine)
        return [to_device(b, engine.device, dtype) for b in islice(loader, self.cfg.eval.batches)]

    @torch.no_grad()
    def __call__(self, model, step: int, engine) -> dict:
        results = {}
        if self.cfg.eval.shards:
            batches = self._batches(engine)
            results.update(self._loss_terms(engine, batches, step))
            if self.cfg.parallel.pp == 1:
                results.update(self.task.heldout_metrics(model, batches))
            elif self.task.heldout_in_pieces:
                results.update(self.task.heldout_reduce(self._pipeline_step(engine).heldout_parts(batches, step)))
        if self.cfg.eval.retrieval_json and self.task.retrieval and self.cfg.parallel.pp == 1:
            results.update(self._retrieval(model, step))
        return results

    def _loss_terms(self, engine, batches, step: int) -> dict:
        from vlmo_large.training.trainer import mean_over_data_parallel
        if self.cfg.parallel.pp > 1:
            sums = self._pipeline_step(engine).evaluate(batches, step)
            return mean_over_data_parallel({k: v.to(engine.device) for k, v in sums.items()}, len(batches))
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            for k, v in engine(batch, step).items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        return mean_over_data_parallel(sums, len(batches))

    def _pipeline_step(self, engine):
        from vlmo_large.data.masking import max_masked_tokens
        from vlmo_large.training.pipeline_engine import PipelineStep
        slots = max_masked_tokens(self.resolved.model.max_text_len, self.cfg.data.mlm_prob)
        return PipelineStep(engine, self.cfg.loss, self.cfg.seed, slots)

    def _retrieval(self, model, step: int) -> dict:
        from vlmo_large.evaluation.heldout_retrieval import heldout_retrieval

        cfg, model_cfg = self.cfg, self.resolved.model
        split = {"shards": cfg.eval.retrieval_shards, "json": cfg.eval.retrieval_json}
        metrics, (images, image_feats, text_feats, gold) = heldout_retrieval(
            model, split, self.tokenizer, model_cfg.image_size, model_cfg.max_text_len)
        if self.tracker is not None and dist.get_rank() == 0:
            self._log_figure(split, images, image_feats, text_feats, gold, step)
        return {f"heldout_{k}": v for k, v in metrics.items() if k != "chance_r1"}

    def _log_figure(self, split, images, image_feats, text_feats, gold, step: int) -> None:
        import json

        from vlmo_large.evaluation import retrieval_examples_figure
        with open(split["json"]) as f:
            captions = json.load(f)["texts"]
        fig = retrieval_examples_figure(images, captions, image_feats, text_feats, gold)
        self.tracker.log_figure(fig, f"retrieval_examples_step{step:06d}.png")
