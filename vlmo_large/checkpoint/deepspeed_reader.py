"""Read a DeepSpeed checkpoint folder tensor by tensor, safely and without loading it whole.

Files are opened with `torch.load(weights_only=True, mmap=True)`: no code runs, and tensor data
stays on disk until a slice is taken. The three DeepSpeed classes that optimizer files pickle
(loss scaler, ZeRO stage enum, fragment address) are read into inert stand-ins, so DeepSpeed is not
even imported. Where a parameter lives:
  ZeRO-1/2 (and DeepSpeed's bf16 optimizer): `param_slice_mappings` give each DP rank's
    (start, numel) of the parameter inside its flat fp32 partition; the pieces in rank order
    make the tensor. Adam's moments are flat the same way.
  ZeRO-3: the parameters of `param_shapes`, in order, each take ceil(numel / dp) elements of every
    rank's flat partition (zero padded at the end).
  no ZeRO: the weights are the `module` of the model-states file (no param_shapes); Adam's
    moments, per parameter, are in its `optimizer` (_Zero0Optimizer).
One set of these files exists per tensor-parallel rank (`mp_rank_XX`).
"""
from __future__ import annotations

import math
import os
import re

import torch

from vlmo_large.formats.io import CheckpointError

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
PARAM_NAMES = "optimizer_param_names"  # client_state: per optimizer group, its parameters' names (ZeRO-0)
_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
DS_STATE_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                 "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                 "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
                 "checkpoint_parallel_dimensions", "sparse_tensor_module_names", "universal_checkpoint_info"}


class _Inert:
    """Stand-in for a pickled DeepSpeed object: keeps its fields, runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _FragmentAddress(_Inert):
    pass


class _ZeroStage(int):
    pass


_STAND_INS = [(_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
              (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
              (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
              (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address")]


def load_ds_file(path: str) -> dict:
    """weights_only + mmap torch.load of one DeepSpeed file; errors name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} as a weights-only torch file "
                              f"(truncated, corrupt, or holding code objects): {str(exc).splitlines()[0]}") from exc


def resolve_tag_dir(path: str, tag: str | None = None) -> str:
    """A folder with `latest` (+ tag folders), a folder of tags, or a tag folder itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if tag is not None:
        return _must_be_tag(os.path.join(path, tag))
    if any(_MODEL.match(f) or _LAYER.match(f) for f in os.listdir(path)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return _must_be_tag(os.path.join(path, f.read().strip()))
    tags = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                  and any(_MODEL.match(f) for f in os.listdir(os.path.join(path, d))))
    if len(tags) == 1:
        return os.path.join(path, tags[0])
    raise CheckpointError(f"{path}: no DeepSpeed model-states files, no 'latest' file"
                          + (f", and several tags {tags}: pass --tag" if tags else ""))


def _must_be_tag(path: str) -> str:
    if not os.path.isdir(path) or not any(_MODEL.match(f) for f in os.listdir(path)):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint tag folder (no *_model_states.pt)")
    return path


class _Chain:
    """Several flat tensors read as one: take(start, n) crosses their boundaries."""

    def __init__(self, flats: list[torch.Tensor]):
        self.flats = flats
        self.starts = [0]
        for flat in flats:
            self.starts.append(self.starts[-1] + flat.numel())

    def take(self, start: int, count: int) -> list[torch.Tensor]:
        pieces, end = [], start + count
        for flat, lo, hi in zip(self.flats, self.starts, self.starts[1:]):
            if hi > start and lo < end:
                pieces.append(flat[max(start, lo) - lo: min(end, hi) - lo])
        return pieces


class _TPRank:
    """The files of one tensor-parallel rank: every tensor at its TP-local shape, in fp32."""

    def __init__(self, folder: str, mp: int, model_files: dict[int, str], optim_files: dict[int, str]):
        self.model_files = model_files
        self.model_file = model_files[min(model_files)]
        self.states = load_ds_file(self.model_file)
        if "param_shapes" not in self.states:
            raise CheckpointError(f"{self.model_file}: no 'param_shapes' (not a DeepSpeed model-states file?)")
        self.module = self.states.get("module") or {}
        buffers = set(self.states.get("buffer_names") or [])
        # ZeRO-0 stores no param_shapes: its module holds every parameter, at full (TP-local) shape
        self.shapes = ({n: tuple(s) for group in self.states["param_shapes"] for n, s in group.items()}
                       if self.states["param_shapes"] else
                       {n: tuple(t.shape) for n, t in self.module.items() if n not in buffers})
        self.optim = {dp: load_ds_file(path)["optimizer_state_dict"] for dp, path in sorted(optim_files.items())}
        self.optim_files = optim_files
        self.stage = self._stage()
        self.dp = len(self.optim) if self.optim else int(self.states.get("dp_world_size") or 1)
        expected = self._partition_count()
        if expected is not None and expected != len(optim_files):
            missing = [d for d in range(expected) if d not in optim_files]
            names = [_optim_name(folder, d, mp, optim_files) for d in missing]
            raise CheckpointError(f"missing shard file(s) {names}: DP={expected} ranks wrote optimizer "
                                  f"states, {len(optim_files)} found")
        if self.stage == 3 and len(model_files) != self.dp:
            raise CheckpointError(f"ZeRO-3 checkpoint in {folder}: {len(model_files)} model-states files of "
                                  f"mp_rank_{mp:02d}, expected {self.dp}")
        self._index = self._build_index()
        self.zero0 = _Zero0Optimizer(self) if self.stage == 0 else None

    def _stage(self) -> int:
        if not self.optim:
            return 0
        first = next(iter(self.optim.values()))
        return int(first.get("zero_stage", 1))  # DeepSpeed's bf16 optimizer: ZeRO-1 layout, no key

    def _partition_count(self) -> int | None:
        if not self.optim:
            return None
        count = next(iter(self.optim.values())).get("partition_count")
        return max(count) if isinstance(count, (list, tuple)) else count

    def _flats(self, dp: int, key: str) -> list[torch.Tensor]:
        osd = self.optim[dp]
        if self.stage == 3:
            if key == "fp32":
                return list(osd["fp32_flat_groups"])
            base = osd["optimizer_state_dict"]["state"]
            return [base[g][key] for g in range(len(osd["fp32_flat_groups"]))]
        if key == "fp32":
            return list(osd["single_partition_of_fp32_groups"])
        base = osd["base_optimizer_state"]
        state = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        return [state[g][key] for g in range(len(osd["single_partition_of_fp32_groups"]))]

    def _build_index(self) -> dict:
        """name -> list of (dp rank, group, start, numel) pieces in order (ZeRO-3: one chain offset)."""
        index: dict = {}
        if self.stage == 3:
            offset = 0
            for name, shape in self.shapes.items():
                index[name] = offset
                offset += math.ceil(math.prod(shape) / self.dp)
            return index
        if self.stage == 0:
            return index
        for dp, osd in self.optim.items():
            for group, mapping in enumerate(osd["param_slice_mappings"]):
                for name, frag in mapping.items():
                    index.setdefault(name, []).append((dp, group, int(frag.start), int(frag.numel)))
        return index

    def step(self) -> int | None:
        if self.zero0 is not None:
            return self.zero0.step()
        if not self.optim:
            return None
        osd = next(iter(self.optim.values()))
        base = osd["optimizer_state_dict"] if self.stage == 3 else osd["base_optimizer_state"]
        state = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        step = state[0].get("step") if state else None
        return None if step is None else int(step)

    def names(self) -> list[str]:
        frozen = self.states.get("frozen_param_shapes") or {}
        buffers = [n for n in self.states.get("buffer_names") or [] if n in self.module]
        return list(self.shapes) + [n for n in frozen if n not in self.shapes] + buffers

    def tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        if name in self.shapes and self.stage == 3:
            return self._zero3(name, key)
        if name in self.shapes and self.stage in (1, 2):
            return self._zero12(name, key)
        if self.zero0 is not None and (key != "fp32" or self.zero0.has_master(name)):
            return self.zero0.tensor(name, key)
        if key != "fp32":
            raise CheckpointError(f"{self.model_file}: no optimizer state '{key}' for tensor '{name}' "
                                  f"(ZeRO stage {self.stage} checkpoint)")
        if name in self.module and self.module[name].numel() > 0:
            return self.module[name].float()
        frozen = (self.states.get("frozen_param_shapes") or {}).get(name)
        if frozen is not None and self.stage == 3:  # each DP rank keeps its slice of a frozen parameter
            pieces = [load_ds_file(path)["frozen_param_fragments"][name].reshape(-1)
                      for _, path in sorted(self.model_files.items())]
            return torch.cat(pieces)[:math.prod(frozen)].view(tuple(frozen)).float()
        if frozen is not None:
            return self.states["frozen_param_fragments"][name].float()
        raise CheckpointError(f"{self.model_file}: tensor '{name}' is not stored")

    def _zero3(self, name: str, key: str) -> torch.Tensor:
        shape = self.shapes[name]
        numel = math.prod(shape)
        per_rank = math.ceil(numel / self.dp)
        pieces = []
        for dp in range(self.dp):
            pieces += self._checked(_Chain(self._flats(dp, key)).take(self._index[name], per_rank), per_rank, dp, name)
        return torch.cat(pieces)[:numel].view(shape).float()

    def _zero12(self, name: str, key: str) -> torch.Tensor:
        shape = self.shapes[name]
        pieces = []
        for dp, group, start, count in self._index.get(name, []):
            flat = self._flats(dp, key)[group]
            pieces += self._checked([flat[start:start + count]], count, dp, name)
        total = sum(p.numel() for p in pieces)
        if total != math.prod(shape):
            raise CheckpointError(f"{self.model_file}: tensor '{name}' has {total} of {math.prod(shape)} elements "
                                  "in the optimizer shards (a shard missing or from another run?)")
        return torch.cat(pieces).view(shape).float()

    def _checked(self, pieces: list[torch.Tensor], want: int, dp: int, name: str) -> list[torch.Tensor]:
        if sum(p.numel() for p in pieces) != want:
            raise CheckpointError(f"{self.optim_files[dp]}: the flat partition ends inside tensor '{name}' "
                                  "(truncated or from another run?)")
        return pieces


class _Zero0Optimizer:
    """Adam's state (and fp32 masters under bf16/fp16) of a ZeRO-0 checkpoint: the model-states
    file's `optimizer`, a torch state dict (or DeepSpeed's bf16/fp16 wrapper of one) whose tensors
    are numbered per parameter group. The names of each group's parameters are the trainer's
    client_state PARAM_NAMES; without it, one group holding every stored parameter in module order."""

    def __init__(self, rank: _TPRank):
        self.file = rank.model_file
        osd = rank.states.get("optimizer") if isinstance(rank.states.get("optimizer"), dict) else {}
        self.base = osd.get("optimizer_state_dict", osd)
        self.masters = osd.get("fp32_groups")
        groups = [list(g["params"]) for g in self.base.get("param_groups", [])]
        names = rank.states.get(PARAM_NAMES)
        if names is None and len(groups) == 1 and len(groups[0]) == len(rank.shapes):
            names = [list(rank.shapes)]
        self.where = {}  # name -> (group, position in group, torch's state id)
        if names is not None:
            if [len(n) for n in names] != [len(g) for g in groups]:
                raise CheckpointError(f"{self.file}: client_state '{PARAM_NAMES}' does not match the optimizer's "
                                      "parameter groups (a file of another run?)")
            self.where = {name: (g, pos, ids[pos]) for g, (ids, group) in enumerate(zip(groups, names))
                          for pos, name in enumerate(group)}
        self.known = names is not None or not groups

    def has_master(self, name: str) -> bool:
        return self.masters is not None and name in self.where

    def tensor(self, name: str, key: str) -> torch.Tensor:
        if not self.known:
            raise CheckpointError(f"{self.file}: ZeRO-0 optimizer state without the names of its parameters "
                                  f"(client_state '{PARAM_NAMES}'); the weights convert, Adam's moments cannot")
        if name not in self.where:
            raise CheckpointError(f"{self.file}: no optimizer state for tensor '{name}' (frozen?)")
        group, pos, sid = self.where[name]
        if key == "fp32":
            return self.masters[group][pos].float()
        state = self.base["state"].get(sid) or self.base["state"].get(str(sid))
        if not state or key not in state:
            raise CheckpointError(f"{self.file}: no optimizer state '{key}' for tensor '{name}' (saved before "
                                  "the first optimizer step?)")
        return state[key].float()

    def step(self) -> int | None:
        slots = [v for v in self.base.get("state", {}).values() if isinstance(v, dict) and "step" in v]
        return int(slots[0]["step"]) if slots else None


def _optim_name(folder: str, dp: int, mp: int, present: dict[int, str]) -> str:
    bf16 = any(os.path.basename(p).startswith("bf16_") for p in present.values())
    return os.path.join(folder, f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")


class DeepSpeedCheckpoint:
    """All TP ranks of one DeepSpeed checkpoint tag."""

    def __init__(self, path: str, tag: str | None = None):
        self.folder = resolve_tag_dir(path, tag)
        files = sorted(os.listdir(self.folder))
        if any(_LAYER.match(f) for f in files):
            raise CheckpointError(f"{self.folder}: pipeline-parallel checkpoint (layer_*-model_states.pt files): "
                                  "read it with checkpoint.pipeline_reader.open_checkpoint")
        model, optim = {}, {}
        for f in files:
            if (m := _MODEL.match(f)):
                model.setdefault(int(m.group(2)), {})[int(m.group(1) or 0)] = os.path.join(self.folder, f)
            elif (m := _OPTIM.match(f)):
                optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(self.folder, f)
        first = load_ds_file(model[min(model)][min(model[min(model)])])
        self.tp = int(first.get("mp_world_size") or len(model))
        for mp in range(self.tp):
            if mp not in model:
                raise CheckpointError(f"missing shard file {os.path.join(self.folder, f'mp_rank_{mp:02d}_model_states.pt')}"
                                      f" (TP={self.tp}: no model states of tensor-parallel rank {mp})")
        self.ranks = [_TPRank(self.folder, mp, model[mp], optim.get(mp, {})) for mp in range(self.tp)]
        self.stage = self.ranks[0].stage
        self.dp = self.ranks[0].dp
        self.states = self.ranks[0].states

    @property
    def client_state(self) -> dict:
        return {k: v for k, v in self.states.items() if k not in DS_STATE_KEYS}

    def names(self) -> list[str]:
        return self.ranks[0].names()

    def shapes(self) -> dict[str, tuple]:
        """{name: TP-local shape} of every parameter, frozen ones included (TP rank 0's)."""
        rank = self.ranks[0]
        frozen = rank.states.get("frozen_param_shapes") or {}
        return {**{n: tuple(s) for n, s in frozen.items()}, **rank.shapes}

    def shards(self, name: str, key: str = "fp32") -> list[torch.Tensor]:
        """The tensor on every TP rank (TP-local shapes), fp32."""
        return [rank.tensor(name, key) for rank in self.ranks]

    def step(self) -> int | None:
        return self.ranks[0].step()

    def describe(self) -> str:
        zero0 = self.ranks[0].zero0
        dtype = "bf16" if any(os.path.basename(p).startswith("bf16_") for p in self.ranks[0].optim_files.values()) \
            else "bf16/fp16" if zero0 is not None and zero0.masters is not None else "fp32/fp16"
        return f"{self.folder}: TP={self.tp} DP={self.dp} ZeRO-{self.stage} ({dtype} training)"
