"""VLMo's own modules as a DeepSpeed `PipelineModule` that runs any task in pieces (tasks/base.py).

Layers: 0 embeds the task's passes (tasks/passes.py embed), 1 + i runs block i of every pass
(passes.run), depth + 1 applies the final norm (passes.finish); the loss function calls the task's
`score` (or `probe`, or `heldout_batch`) on the last stage. A layer is a thin callable over the
modules of the one VLMo this rank keeps: the tensors of its stage (parallel/layout.py stage_of),
the others dropped. VLMo's top modules are registered as the pipeline's own, so parameter names are
VLMo's, and each layer's state_dict (what DeepSpeed writes as layer_LL-model_TT-model_states.pt) is
keyed by VLMo names.

Between stages the tuple holds, per pass: its states, its text mask (not for an image pass) and,
past layer vl_start, its VL branch. The first stage's inputs are each pass's PassInput fields in
order (first_stage_inputs).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields, replace

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import PipelineModule

from vlmo_large.parallel import state
from vlmo_large.parallel.layout import pipeline_parts, stage_of
from vlmo_large.parallel.sharding import gather_full_state_dict
from vlmo_large.tasks import passes

INPUT_FIELDS = tuple(f.name for f in fields(passes.PassInput))


def keep_stage(model, stage: int, pp: int) -> None:
    """Drop every parameter of `model` that another pipeline stage holds."""
    depth = model.cfg.depth
    for prefix, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{prefix}.{name}" if prefix else name
            if param is not None and stage_of(full, depth, pp) != stage:
                module._parameters[name] = None


def layer_of(name: str, depth: int) -> int:
    """The pipeline layer that holds VLMo tensor `name`: 0 the embeddings (and the MIM mask token),
    1 + i block i, depth + 1 the rest (final norm, heads)."""
    if name.startswith("backbone.blocks."):
        return 1 + stage_of(name, depth, depth)  # one block per stage
    return 0 if stage_of(name, depth, 2) == 0 else depth + 1


class Layer:
    """Pipeline layer `index`: `run` over the pipeline's VLMo, whose tensors of this layer are its state."""

    def __init__(self, pipe, index: int, run):
        self.pipe, self.index, self.run = pipe, index, run

    def __call__(self, inputs):
        return self.run((inputs,) if torch.is_tensor(inputs) else tuple(inputs))

    def state_dict(self) -> dict:
        depth = self.pipe.vlmo.cfg.depth
        return {name: t for name, t in self.pipe.vlmo.state_dict().items() if layer_of(name, depth) == self.index}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        mine = self.state_dict()
        if strict and set(state) != set(mine):
            raise KeyError(f"layer state {sorted(set(state) ^ set(mine))[:4]} differs from this stage's VLMo tensors")
        with torch.no_grad():
            for name, tensor in state.items():
                mine[name].copy_(tensor)


class TaskPipeline(PipelineModule):
    """`model`: VLMo (TP-split, frozen for the task), whole or with only this rank's stage given
    storage (parallel/stage_build.py); this rank keeps its stage of it."""

    def __init__(self, model, task, topology):
        cfg, pp = model.cfg, topology.get_dim("pipe")
        keep_stage(model, topology.get_coord(dist.get_rank()).pipe, pp)
        layers = ([Layer(self, 0, self._embed)]
                  + [Layer(self, 1 + i, lambda x, i=i: self._blocks(x, i)) for i in range(cfg.depth)]
                  + [Layer(self, cfg.depth + 1, self._finish)])
        super().__init__(layers, topology=topology, loss_fn=self._loss)
        self.__dict__["vlmo"] = model  # not a submodule: its children are registered as the pipeline's own
        for name, child in model.named_children():
            self.add_module(name, child)
        self.to(get_accelerator().device_name(self.local_rank))
        self.task, self.specs, self.mode, self.ctx, self.terms = task, task.passes, "train", None, None
        self.metric_parts = []  # not `parts`: DeepSpeed's layer bounds

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's partition hook (called by its __init__): the layer bounds of stage_blocks."""
        self.parts = pipeline_parts(len(self._layer_specs) - 2, self.num_stages)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    def use(self, mode: str, ctx, specs: tuple = ()) -> None:
        """mode "probe": the task's probe passes without their VL branch, the loss returns the probe;
        "train": every pass, the loss returns the loss; "eval": every pass, the loss returns the loss
        and its terms; "metrics": `specs` (Task.heldout_inputs' passes), the loss keeps each
        micro-batch's Task.heldout_batch in `metric_parts` and returns a zero. All ranks switch together
        (the engine resets its activation shapes)."""
        if mode != "metrics":
            specs = self.task.passes
        if mode == "probe":
            specs = tuple(replace(specs[i], vl_branch=False) for i in self.task.probe_passes)
        self.specs, self.mode, self.ctx, self.metric_parts = specs, mode, ctx, []

    # -- the tuple between stages -----------------------------------------------------------------
    def _states(self, tensors: tuple, layer: int) -> list:
        """PassStates from the tuple entering block `layer` (depth: the final norm)."""
        out, it = [], iter(tensors)
        for spec in self.specs:
            x = next(it)
            mask = None if spec.mode == "image" else next(it)
            vl = next(it) if spec.vl_branch and layer > self.vlmo.cfg.vl_start else None
            out.append(passes.PassState(x, mask, vl))
        return out

    @staticmethod
    def _tuple(states: list) -> tuple:
        return tuple(t for s in states for t in (s.x, s.mask, s.vl) if t is not None)

    def _embed(self, tensors: tuple) -> tuple:
        n = len(INPUT_FIELDS)
        inputs = [passes.PassInput(**{f.name: _field(f, t) for f, t in zip(fields(passes.PassInput), tensors[i * n:])})
                  for i in range(len(self.specs))]
        return self._tuple([passes.embed(self.vlmo, spec, inp) for spec, inp in zip(self.specs, inputs)])

    def _blocks(self, tensors: tuple, i: int) -> tuple:
        return self._tuple([passes.run(self.vlmo, spec, state, i, i + 1)
                            for spec, state in zip(self.specs, self._states(tensors, i))])

    def _finish(self, tensors: tuple) -> tuple:
        outputs = [passes.finish(self.vlmo, state) for state in self._states(tensors, self.vlmo.cfg.depth)]
        return tuple(t for o in outputs for t in (o.x, o.vl) if t is not None)

    def _loss(self, tensors, batch: dict):
        it = iter((tensors,) if torch.is_tensor(tensors) else tensors)
        outputs = [passes.PassOutput(next(it), next(it) if spec.vl_branch else None) for spec in self.specs]
        if self.mode == "probe":
            return self.task.probe(self.vlmo, outputs, batch, self.ctx)
        if self.mode == "metrics":  # kept here: parts differ in shape, which DeepSpeed's loss sum rejects
            self.metric_parts.append(self.task.heldout_batch(self.vlmo, outputs, batch))
            return outputs[0].x.new_zeros(())
        terms = self.task.score(self.vlmo, outputs, batch, self.ctx)
        self.terms = OrderedDict((k, terms[k].detach().float()) for k in self.task.terms)
        if self.mode == "eval":
            return torch.stack([terms["loss"].detach().float(), *self.terms.values()])
        return terms["loss"]

    def get_additional_losses(self):
        """The terms of the last micro-batch; zeros with the same keys on the other stages, which
        only read how many there are."""
        if self.mode != "train" or not self.task.terms:
            return None
        if self.terms is None:
            return OrderedDict((name, torch.zeros(())) for name in self.task.terms)
        return self.terms


def first_stage_inputs(pass_inputs: list) -> tuple:
    """The tuple layer 0 takes: each PassInput's fields in order, an absent one as an empty tensor,
    a number as a 0-d tensor (DeepSpeed's first stage takes tensors only)."""
    return tuple(torch.empty(0) if t is None else t if torch.is_tensor(t) else torch.tensor(t)
                 for inp in pass_inputs for t in (getattr(inp, name) for name in INPUT_FIELDS))


def _field(field, tensor: torch.Tensor):
    """A PassInput field back from first_stage_inputs' tensor."""
    if isinstance(field.default, int):  # a number field
        return int(tensor)
    return tensor if tensor.numel() else None


def gather_plain_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Plain VLMo tensors of every stage, on every rank of the pipeline (for exports and tests: it
    moves the whole model through all_gather_object; DeepSpeed's checkpoints are per layer)."""
    part = gather_full_state_dict(pipe.vlmo, state.tp_group())
    parts = [None] * pipe._grid.pipe_parallel_size
    dist.all_gather_object(parts, part, group=pipe._grid.get_pipe_parallel_group())
    return {k: v for p in parts for k, v in p.items()}
