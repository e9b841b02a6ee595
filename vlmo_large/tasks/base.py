"""What a task is: the data it reads, the encoder passes it runs, how it scores them, what it trains.

A task is one object (a subclass of Task, registered by name in registry.py). The trainer, the
pipeline, held-out evaluation, the FLOP count and the benchmarks read everything stage-specific
from it, so adding a task is one new file and its registration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmo_large.parallel.collectives import group_rank
from vlmo_large.tasks.passes import encode
from vlmo_large.tasks.loss_weights import LossWeights

DATA_KINDS = ("image", "text", "image_text", "vqa", "nlvr2")  # the data loader's kinds (data/loader.py)


@dataclass(frozen=True)
class EncoderPass:
    """One encoder call of a training step: `mode` ("image", "text" or "pair"), run on `copies` times
    the micro-batch's rows, with the VL-branch top layers too (`vl_branch`), and the last layer
    computing only the positions `keep` names ("cls", "text", or None: all). tasks/passes.py runs
    them (in one process and in the pipeline), and step_flops.py counts a step's FLOPs from them."""
    mode: str
    copies: int = 1
    vl_branch: bool = False
    keep: str | None = None

    def kept(self, text_len: int) -> int | None:
        return {"cls": 1, "text": text_len, None: None}[self.keep]


@dataclass(frozen=True)
class StepContext:
    """What a task's forward needs besides the model and the batch.

    group: the data-parallel group the batch-wide terms span (ITC, ITM negatives); None: one process.
    seed, step: seed the step's own random draws (negative_generator), so a resumed run draws what an
    uninterrupted one would whatever the global RNG state. mlm_slots: the MLM head's positions per
    row (losses.mlm_loss); None: every position."""
    weights: LossWeights = LossWeights()
    group: Any = None
    seed: int = 0
    step: int = 0
    mlm_slots: int | None = None

    def generator(self, device) -> torch.Generator:
        """This step's generator on this data-parallel rank."""
        return torch.Generator(device=device).manual_seed(
            (self.seed * 1_000_003 + self.step) * 4099 + group_rank(self.group))


class Task:
    """A training objective. Subclasses set the class attributes and implement `inputs` and `score`
    (and `probe` when they have probe passes): `forward` chains them around the encoder passes, and
    the pipeline calls the same pieces on the stages that hold what they use. A task that implements
    `forward` alone (a plugin) trains in one process only.

    name: the run config's `stage` value that selects it. data_kind: the loader kind it reads
    (DATA_KINDS). passes: its encoder calls in order (EncoderPass). terms: the names of the terms its
    forward reports besides "loss". trainable: regexes (full match) over VLMo's parameter names;
    the rest is frozen; None: everything trains. min_global_batch: the fewest samples a step may
    hold across data-parallel ranks. retrieval: held-out evaluation may also run zero-shot
    retrieval (eval.retrieval_json) with this task's model. probe_passes: indices of `passes` whose
    outputs `probe` turns into what the other passes' inputs need (stage vl: the ITC logits, which
    pick the ITM hard negatives); the pipeline runs them first as a no-grad schedule.
    """
    name: str = ""
    data_kind: str = "image_text"
    passes: tuple[EncoderPass, ...] = ()
    terms: tuple[str, ...] = ()
    trainable: tuple[str, ...] | None = None
    min_global_batch: int = 1
    retrieval: bool = False
    probe_passes: tuple[int, ...] = ()

    @property
    def reads_text(self) -> bool:
        return self.data_kind != "image"

    @property
    def in_pieces(self) -> bool:
        """Whether the task implements inputs/score (what the pipeline calls)."""
        return type(self).score is not Task.score

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        """The PassInput (tasks/passes.py) of each of `passes`; with probe passes and probe=None,
        None for the passes that need the probe."""
        raise NotImplementedError

    def probe(self, model, outputs: list, batch: dict, ctx: StepContext) -> tuple:
        """Tensors `inputs` needs, from the PassOutputs of `probe_passes` (their main states only)."""
        raise NotImplementedError

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """The PassOutput of each pass -> {"loss": the scalar to backpropagate, and each of `terms`}."""
        raise NotImplementedError

    def encode(self, model, indices, inputs: list) -> dict:
        """{index: PassOutput} of passes `indices` in one process (a task may run some together)."""
        return {i: encode(model, self.passes[i], inputs[i]) for i in indices}

    def forward(self, model, batch: dict, ctx: StepContext) -> dict:
        """-> {"loss": the scalar to backpropagate, and each of `terms`: a detached-able scalar}.
        In one process the probe reads the training passes' own outputs (no extra pass)."""
        outputs, probe = {}, None
        if self.probe_passes:
            outputs = self.encode(model, self.probe_passes, self.inputs(batch, ctx))
            with torch.no_grad():  # detached: no view of a graph tensor made in no-grad mode (hooks reject those)
                probe = self.probe(model, [outputs[i].detach() for i in self.probe_passes], batch, ctx)
        rest = [i for i in range(len(self.passes)) if i not in outputs]
        outputs.update(self.encode(model, rest, self.inputs(batch, ctx, probe)))
        return self.score(model, [outputs[i] for i in range(len(self.passes))], batch, ctx)

    def heads(self, cfg, options) -> dict:
        """New modules this task adds to VLMo, by attribute name (e.g. a fine-tuning classifier;
        names follow the reference layout, docs/MODEL.md section 7). cfg: the ModelConfig; options:
        the run's TaskOptions (tasks/options.py). Default: none."""
        return {}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        """Forward FLOPs of the task's heads over a host micro-batch (the encoders are counted from
        `passes`); 0 leaves them out of MFU."""
        return 0.0

    @property
    def heldout_in_pieces(self) -> bool:
        """Whether the held-out metrics come in pieces (heldout_batch/heldout_reduce), which the
        pipeline computes too; a task that implements `heldout_metrics` alone has them in one process only."""
        return type(self).heldout_batch is not Task.heldout_batch

    def heldout_inputs(self, batches: list) -> tuple[tuple[EncoderPass, ...], list]:
        """(the encoder passes of the held-out metrics, per batch (their PassInputs, the batch
        `heldout_batch` reads)). Default: the task's passes and inputs (a task without probe passes)."""
        ctx = StepContext()
        return self.passes, [(self.inputs(batch, ctx), batch) for batch in batches]

    def heldout_batch(self, model, outputs: list, batch: dict) -> dict:
        """One batch's part of the held-out metrics from the PassOutputs of heldout_inputs' passes:
        {name: tensor} (sums, counts, rows) for heldout_reduce. The pipeline's last stage calls it."""
        raise NotImplementedError

    def heldout_reduce(self, parts: list) -> dict:
        """The metrics from heldout_batch's parts of this rank's batches, over every data-parallel rank
        (collective over the data-parallel group: every rank calls it, at any layout)."""
        raise NotImplementedError

    @torch.no_grad()
    def heldout_metrics(self, model, batches: list) -> dict:
        """Metrics held-out evaluation reports besides the loss terms (every rank calls it): in one
        process, the passes of heldout_inputs, heldout_batch of each batch, heldout_reduce. Default
        without those pieces: none."""
        if not self.heldout_in_pieces:
            return {}
        model = getattr(model, "module", model)
        specs, items = self.heldout_inputs(batches)
        parts = []
        for inputs, batch in items:
            outputs = [encode(model, spec, inp) for spec, inp in zip(specs, inputs)]
            parts.append(self.heldout_batch(model, outputs, batch))
        return self.heldout_reduce(parts)

    def __repr__(self) -> str:
        return f"<task {self.name}: {self.data_kind} data, terms {', '.join(self.terms)}>"
