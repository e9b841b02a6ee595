"""Everything about a run that can be checked before a process group exists.

`resolve_run(cfg, ds_config, world_size, ds_path)` returns the model config and the complete
DeepSpeed config, or raises a `ConfigError` with one line naming the key, file or layout at fault:
value ranges, model overrides, the DeepSpeed file (deepspeed_config_check.py), layout and batch
arithmetic, then the files (shards, tokenizer against model.vocab_size, a writable output_dir).
"""
from __future__ import annotations

import copy
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass

from vlmo_large.config import ModelConfig, get_preset
from vlmo_large.parallel.layout import data_parallel_size, validate_layout
from vlmo_large.training.deepspeed_config_check import check_deepspeed_config
from vlmo_large.errors import UserError
from vlmo_large.tasks.registry import get_task, import_plugins, task_names
from vlmo_large.training.run_config import DECAY_RULES, ConfigError, RunConfig

RUN_OWNED = ("optimizer", "scheduler")  # the run config sets these; the DeepSpeed file must not


@dataclass
class ResolvedRun:
    model: ModelConfig
    ds_config: dict
    world_size: int
    dp: int
    micro: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.grad_accum * self.dp


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(ds: dict, key: str):
    value = ds.get(key)
    return None if value in (None, "auto") else value


def resolve_batch(cfg: RunConfig, ds: dict, dp: int) -> tuple[int, int]:
    """(micro, grad_accum) from the run config and the DeepSpeed file; they must agree."""
    ds_micro, ds_accum, ds_train = (_number(ds, k) for k in (
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
    for key, value in (("batch.micro", cfg.batch.micro), ("batch.grad_accum", cfg.batch.grad_accum)):
        _check(value is None or value >= 1, f"{key}={value} must be at least 1")
    for run_value, ds_value, run_key, ds_key in ((cfg.batch.micro, ds_micro, "batch.micro", "train_micro_batch_size_per_gpu"),
                                                 (cfg.batch.grad_accum, ds_accum, "batch.grad_accum", "gradient_accumulation_steps")):
        _check(run_value is None or ds_value is None or run_value == ds_value,
               f"{run_key}={run_value} disagrees with {ds_key}={ds_value} of the DeepSpeed config")
    micro = cfg.batch.micro or ds_micro
    accum = cfg.batch.grad_accum or ds_accum
    if accum is None and cfg.batch.micro is not None:
        accum = 1  # the run config's batch stands; a train_batch_size that disagrees is reported below
    if micro is None:
        _check(ds_train is not None, "no batch size: set batch.micro (or train_micro_batch_size_per_gpu / train_batch_size)")
        accum = accum or 1
        _check(ds_train % (accum * dp) == 0, f"train_batch_size={ds_train} is not divisible by grad_accum "
               f"({accum}) * data-parallel size ({dp}): train_batch_size = micro * grad_accum * dp")
        micro = ds_train // (accum * dp)
    if accum is None:
        accum = 1 if ds_train is None else ds_train // (micro * dp)
    _check(micro >= 1 and accum >= 1, f"batch sizes must be positive (micro={micro}, grad_accum={accum})")
    _check(ds_train is None or ds_train == micro * accum * dp,
           f"train_batch_size={ds_train} != micro ({micro}) * grad_accum ({accum}) * data-parallel size ({dp}) "
           f"= {micro * accum * dp}: train_batch_size = micro * grad_accum * dp")
    return micro, accum


def _check_eval_files(cfg: RunConfig) -> None:
    ev = cfg.eval
    if ev.shards:
        from vlmo_large.data.shard_list import expand_shards
        try:
            expand_shards(ev.shards)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"eval.shards: {exc}") from exc
    _check(bool(ev.retrieval_shards) == bool(ev.retrieval_json),
           "eval.retrieval_shards and eval.retrieval_json are set together (images and their captions)")
    if ev.retrieval_json:
        _check(os.path.isfile(ev.retrieval_json), f"eval.retrieval_json: file not found: {ev.retrieval_json}")
    _check(ev.batches > 0, f"eval.batches={ev.batches} must be > 0")
    _check(not cfg.eval_every or ev.shards or ev.retrieval_json,
           f"eval_every={cfg.eval_every} needs eval.shards or eval.retrieval_json")


def _check_first_shard_is_a_tar(paths: list[str]) -> None:
    """The first local shard (URLs are only known once read) must open as a tar: a wrong file
    given as the data would otherwise surface as a traceback or as every shard skipped."""
    first = next((p for p in paths if os.path.isfile(p)), None)
    if first is None:
        return
    try:
        with tarfile.open(first, mode="r|*") as tar:  # as data/tar_reader.py reads shards
            tar.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.shards: {first} is not a tar file ({reason})") from exc


def _check_tokenizer(path: str, model_cfg: ModelConfig) -> None:
    from vlmo_large.data import load_tokenizer
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # sentencepiece / HF tokenizers raise their own types for a file they cannot read
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.tokenizer: {path} is not a SentencePiece model or WordPiece vocab.txt "
                          f"({message})") from exc
    _check(tokenizer.vocab_size <= model_cfg.vocab_size,
           f"data.tokenizer: {path} has {tokenizer.vocab_size} pieces but model.vocab_size is "
           f"{model_cfg.vocab_size} (preset '{model_cfg.name}'): set model.vocab_size={tokenizer.vocab_size} "
           f"or more, or train the tokenizer with --vocab-size {model_cfg.vocab_size} or less")


def _check_writable_dir(key: str, path: str) -> None:
    """`path` is or can become a directory this process writes to. Nothing is left behind: a probe
    directory is made and removed in `path`, or in its nearest existing parent."""
    _check(not os.path.isfile(path), f"{key}: {path} is a file, not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _check(os.path.isdir(parent), f"{key}: cannot create {path}: {parent} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {parent}: {exc.strerror}") from exc


def _check_files(cfg: RunConfig, model_cfg: ModelConfig) -> None:
    data = cfg.data
    _check(data.source in ("shards", "random"), f"data.source='{data.source}' must be 'shards' or 'random'")
    if data.source == "shards":
        _check(bool(data.shards), "data.shards is not set (a brace pattern or a list of .tar files)")
        from vlmo_large.data.shard_list import expand_shards
        try:  # a pattern naming no existing file is an error; single missing shards are the stream's to count
            paths = expand_shards(data.shards)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"data.shards: {exc}") from exc
        _check(get_task(cfg.stage).data_kind != "vqa" or bool(cfg.task.answers),
               f"task.answers is not set: stage '{cfg.stage}' reads VQA shards, whose soft targets are scores of "
               "the answer vocabulary (tools/make_shards.py vqa --answers writes it)")
        if get_task(cfg.stage).reads_text:
            _check(bool(data.tokenizer), f"data.tokenizer is not set (stage '{cfg.stage}' reads text)")
            _check(os.path.exists(data.tokenizer), f"data.tokenizer: file not found: {data.tokenizer}")
            _check_tokenizer(data.tokenizer, model_cfg)
        _check_first_shard_is_a_tar(paths)
    _check_eval_files(cfg)
    if cfg.init is not None:
        _check(os.path.exists(cfg.init), f"init: checkpoint not found: {cfg.init}")
    if cfg.resume not in (None, "auto"):
        _check(os.path.isdir(cfg.resume), f"resume: checkpoint directory not found: {cfg.resume}")
    _check_writable_dir("output_dir", cfg.output_dir)
    if cfg.checkpoint.dir:
        _check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)


def _check_ranges(cfg: RunConfig) -> None:
    from vlmo_large.data.transforms import AUGMENTS

    s, optim, data = cfg.schedule, cfg.optim, cfg.data
    for ok, message in (
        (cfg.stage in task_names(), f"stage='{cfg.stage}' must be one of {', '.join(task_names())}"),
        (s.steps is None or s.steps >= 1, f"schedule.steps={s.steps} must be at least 1"),
        (s.epochs is None or s.epochs > 0, f"schedule.epochs={s.epochs} must be positive"),
        (s.epoch_samples is None or s.epoch_samples >= 1, f"schedule.epoch_samples={s.epoch_samples} must be at least 1"),
        ((s.epochs is None) == (s.epoch_samples is None), "schedule.epochs and schedule.epoch_samples are set together "
                                                          "(steps = ceil(epochs * epoch_samples / global batch))"),
        (s.steps is None or s.epochs is None, f"schedule.steps={s.steps} and schedule.epochs={s.epochs} are both set: "
                                              "give the length once, as steps or as epochs"),
        (s.warmup is None or 0 <= s.warmup, f"schedule.warmup={s.warmup} must be >= 0"),
        (s.warmup_ratio is None or 0.0 <= s.warmup_ratio <= 1.0, f"schedule.warmup_ratio={s.warmup_ratio} must lie in [0, 1]"),
        (s.warmup is None or s.warmup_ratio is None, f"schedule.warmup={s.warmup} and schedule.warmup_ratio="
                                                     f"{s.warmup_ratio} are both set: give the warmup once"),
        (s.decay in ("linear", "cosine"), f"schedule.decay='{s.decay}' must be 'linear' or 'cosine'"),
        (0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={s.min_lr_ratio} must lie in [0, 1]"),
        (optim.lr > 0, f"optim.lr={optim.lr} must be positive"),
        (len(optim.betas) == 2, f"optim.betas must have two values, got {optim.betas}"),
        (all(0.0 <= b < 1.0 for b in optim.betas), f"optim.betas={optim.betas}: each must lie in [0, 1)"),
        (optim.eps > 0, f"optim.eps={optim.eps} must be positive"),
        (optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0"),
        (optim.grad_clip >= 0, f"optim.grad_clip={optim.grad_clip} must be >= 0 (0 turns clipping off)"),
        (optim.decay_rule in DECAY_RULES, f"optim.decay_rule='{optim.decay_rule}' must be one of "
                                          f"{', '.join(DECAY_RULES)}"),
        (optim.head_lr_mult > 0, f"optim.head_lr_mult={optim.head_lr_mult} must be positive"),
        (0.0 < optim.layer_decay <= 1.0, f"optim.layer_decay={optim.layer_decay} must lie in (0, 1] (1 turns it off)"),
        (cfg.task.num_answers is None or cfg.task.num_answers >= 1,
         f"task.num_answers={cfg.task.num_answers} must be at least 1"),
        (cfg.task.rerank_k >= 0, f"task.rerank_k={cfg.task.rerank_k} must be >= 0 (0: dual encoder only)"),
        (cfg.task.answers is None or os.path.isfile(cfg.task.answers),
         f"task.answers: file not found: {cfg.task.answers}"),
        (0.0 < data.mlm_prob <= 1.0, f"data.mlm_prob={data.mlm_prob} must lie in (0, 1]"),
        (0.0 < data.mim_ratio < 1.0, f"data.mim_ratio={data.mim_ratio} must lie in (0, 1)"),
        (data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0 (0: load in the main process)"),
        (data.augment in AUGMENTS, f"data.augment='{data.augment}' must be one of {', '.join(AUGMENTS)}"),
        (data.random_distinct >= 0, f"data.random_distinct={data.random_distinct} must be >= 0"),
        (cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every} must be >= 0"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep} must be at least 1"),
        (cfg.log_every >= 1, f"log_every={cfg.log_every} must be at least 1"),
        (cfg.eval_every >= 0, f"eval_every={cfg.eval_every} must be >= 0"),
    ):
        _check(ok, message)


def resolve_run(cfg: RunConfig, ds_config: dict, world_size: int,
                ds_path: str = "the DeepSpeed config") -> ResolvedRun:
    try:  # every rank resolves the run: each imports the modules that register the config's tasks
        import_plugins(cfg.plugins)
    except UserError as exc:
        raise ConfigError(str(exc)) from exc.__cause__
    _check_ranges(cfg)
    try:  # the keys and types of cfg.model were checked when the run config was read
        cfg.model.update(task_model_overrides(cfg))  # kept in the run config a checkpoint stores
        model_cfg = get_preset(cfg.preset, **cfg.model)
    except ValueError as exc:
        raise ConfigError(f"preset: {exc}") from exc
    check_deepspeed_config(ds_config, ds_path)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _check(tp >= 1 and pp >= 1, f"parallel.tp={tp} and parallel.pp={pp} must be at least 1")
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    try:  # combinations of model keys, then the layout rules (parallel/layout.py)
        model_cfg.validate(tensor_parallel=tp, key_prefix="model.")
        dp = data_parallel_size(world_size, tp, pp)
        validate_layout(model_cfg, tp, pp, dp, zero, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _check(not (model_cfg.compile and zero == 3), "model.compile=true with zero_optimization.stage=3: ZeRO-3's "
           "parameter hooks are torch.compiler.disable'd functions, which a whole-graph compiled block cannot call "
           "(launchers/CLUSTER.md); use ZeRO-1 or 2 (as ds_configs/*_zero2_bf16.json) or model.compile=false")
    _check(model_cfg.num_vl_layers > 0 or not any(p.vl_branch for p in get_task(cfg.stage).passes),
           f"stage '{cfg.stage}' reads its passes' VL branch, which needs vision-language layers: "
           f"model.vl_start={model_cfg.vl_start} must be below model.depth={model_cfg.depth}")
    _check(pp == 1 or get_task(cfg.stage).in_pieces, f"stage '{cfg.stage}' with parallel.pp={pp}: the task "
           "implements forward only, and the pipeline calls its inputs/score (tasks/base.py); set parallel.pp=1")
    for key in RUN_OWNED:
        _check(key not in ds_config, f"the DeepSpeed config sets '{key}': set it in the run config (optim.*, schedule.*) instead")
    clip = ds_config.get("gradient_clipping")
    _check(clip in (None, "auto") or float(clip) == cfg.optim.grad_clip,
           f"gradient_clipping={clip} of the DeepSpeed config disagrees with optim.grad_clip={cfg.optim.grad_clip}")
    micro, accum = resolve_batch(cfg, ds_config, dp)
    resolve_schedule(cfg, micro * accum * dp)
    tokenizer_from_init(cfg)
    least = get_task(cfg.stage).min_global_batch
    if least > 1:
        _check(micro * dp >= least, f"stage '{cfg.stage}' needs at least {least} samples across data-parallel "
               f"ranks per step, got micro {micro} * dp {dp}")
    _check_files(cfg, model_cfg)
    return ResolvedRun(model_cfg, complete_ds_config(cfg, ds_config, micro, accum, dp),
                       world_size, dp, micro, accum)


def task_model_overrides(cfg: RunConfig) -> dict:
    """The ModelConfig fields the run's task needs (Task.model_overrides, e.g. NLVR2's third
    modality row); a run config's `model` section that sets one of them otherwise is an error."""
    needed = dict(getattr(get_task(cfg.stage), "model_overrides", None) or {})
    for key, value in needed.items():
        if cfg.model.get(key, value) != value:
            raise ConfigError(f"model.{key}={cfg.model[key]} conflicts with stage '{cfg.stage}', which needs "
                              f"{key}={value}; leave model.{key} unset")
    return {k: v for k, v in needed.items() if k not in cfg.model}


def resolve_schedule(cfg: RunConfig, global_batch: int) -> None:
    """Fill in schedule.steps (from epochs, else 1000) and schedule.warmup (from warmup_ratio, else
    100) in `cfg`, then check them together."""
    s = cfg.schedule
    if s.steps is None:
        s.steps = math.ceil(s.epochs * s.epoch_samples / global_batch) if s.epochs is not None else 1000
    if s.warmup is None:
        s.warmup = round(s.warmup_ratio * s.steps) if s.warmup_ratio is not None else 100
    _check(s.warmup <= s.steps, f"schedule.warmup={s.warmup} exceeds schedule.steps={s.steps}: the learning "
                                f"rate would never reach optim.lr; set schedule.warmup to at most {s.steps}")


def tokenizer_from_init(cfg: RunConfig) -> None:
    """An export carries its tokenizer (checkpoint/plain.py write_export): a run started from one
    needs no data.tokenizer."""
    if cfg.data.tokenizer or not cfg.init or not os.path.isdir(cfg.init):
        return
    from vlmo_large.checkpoint.plain import export_tokenizer
    cfg.data.tokenizer = export_tokenizer(cfg.init)


def complete_ds_config(cfg: RunConfig, ds: dict, micro: int, accum: int, dp: int) -> dict:
    """The DeepSpeed file plus what the run config decides."""
    ds = copy.deepcopy(ds)
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=micro * accum * dp, gradient_clipping=cfg.optim.grad_clip)
    params = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
              "weight_decay": cfg.optim.weight_decay}
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 10 ** 9)  # progress is ours (tqdm + summary lines)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
