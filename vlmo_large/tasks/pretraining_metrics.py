"""Held-out metrics of tasks vl and retrieval (evaluation/pretraining.py evaluate_pretraining:
zero-shot retrieval R@k, ITM and MLM accuracy) as the Task's held-out pieces (tasks/base.py), so the
pipeline's last stage computes them as one process does.

Their passes are evaluate_pretraining's encoder calls, in eval mode, whole sequences, no VL branch:
the image and the text (the dual encoder), the fused positives, the fused pairs with the images
rotated by the batch's negative shift (all rows: a pipeline's passes keep one shape; batch_metrics
counts only the rows whose image is another picture) and, when the batches have MLM labels, the
fused MLM rows.
"""
from __future__ import annotations

from vlmo_large.evaluation.gather import default_group
from vlmo_large.evaluation.pretraining import batch_metrics, evaluate_pretraining, has_mlm, plan_batches, reduce_batches
from vlmo_large.tasks.base import EncoderPass
from vlmo_large.tasks.passes import PassInput

PASSES = (EncoderPass("image"), EncoderPass("text"), EncoderPass("pair"), EncoderPass("pair"))
MLM_PASS = EncoderPass("pair")


class PretrainingMetrics:
    """A Task's held-out metrics as evaluate_pretraining's (seed 0, the data-parallel group)."""

    def heldout_inputs(self, batches: list) -> tuple:
        planned = list(plan_batches(batches))
        with_mlm = any(has_mlm(batch) for batch in planned)
        specs = PASSES + ((MLM_PASS,) if with_mlm else ())
        return specs, [(_pass_inputs(batch, with_mlm, has_mlm(batch)), batch) for batch in planned]

    def heldout_batch(self, model, outputs: list, batch: dict) -> dict:
        image, text, positive, negative, *mlm = (out.x for out in outputs)
        return batch_metrics(model, image, text, positive, negative, mlm[0] if mlm else None, batch)

    def heldout_reduce(self, parts: list) -> dict:
        return reduce_batches(parts, default_group())

    def heldout_metrics(self, model, batches: list) -> dict:
        """In one process: evaluate_pretraining (the backbone's own encoder calls, in eval mode)."""
        return evaluate_pretraining(model, batches)


def _pass_inputs(batch: dict, with_mlm: bool, batch_has_mlm: bool) -> list:
    """PASSES' inputs (and MLM_PASS's when with_mlm: the text itself for a batch without MLM labels,
    whose counts batch_metrics leaves out)."""
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    inputs = [PassInput(image=images), PassInput(ids=ids, mask=mask), PassInput(ids=ids, mask=mask, image=images),
              PassInput(ids=ids, mask=mask, image=images.roll(batch["negative_shift"], 0))]
    if with_mlm:
        inputs.append(PassInput(ids=batch["mlm_ids"] if batch_has_mlm else ids, mask=mask, image=images))
    return inputs
