"""Pretrain VLMo: one stage (mim, text_mlm or vl) from a run config and a DeepSpeed config.

    deepspeed launchers/pretrain.py --ds_config ds_configs/cpu_fp32.json --config run.yaml schedule.steps=50
    torchrun --nproc_per_node 2 launchers/pretrain.py --ds_config ... --config ... [key=value ...]
    python launchers/pretrain.py --ds_config ... --config ...          # one process

Every configuration problem is reported as one line `error: ...` (exit status 2) before any
process group or model exists.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # `import deepspeed` imports mlflow
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|tp_group is None).*")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ZeRO, precision)")
    parser.add_argument("--config", default=None, help="run config, YAML or JSON")
    parser.add_argument("--init", default=None, help="weights to start from (overrides the run config's init)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. schedule.steps=100 optim.lr=1e-4")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace):
    from vlmo_large.training.run_config import load_run_config, read_mapping
    from vlmo_large.training.validation import resolve_run

    overrides = list(args.overrides)
    overrides += [f"init={args.init}"] if args.init else []
    overrides += [f"resume={args.resume}"] if args.resume else []
    cfg = load_run_config(args.config, overrides)
    ds_config = read_mapping(args.ds_config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg, resolve_run(cfg, ds_config, world_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from vlmo_large.training.run_config import ConfigError

    try:
        cfg, resolved = resolve(args)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from vlmo_large.cpu_memory import retain_freed_memory_on_cpu
    retain_freed_memory_on_cpu()
    if not os.environ.get("OMP_NUM_THREADS") and "WORLD_SIZE" in os.environ:
        import torch  # ranks sharing a host would otherwise each take every core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    from vlmo_large.parallel import state
    if cfg.parallel.pp > 1:
        from vlmo_large.training.pipeline_trainer import PipelineTrainer as Trainer
    else:
        from vlmo_large.training.trainer import Trainer

    tracker = make_tracker(cfg, resolved, [args.config, args.ds_config])
    status = "FAILED"
    try:
        evaluate = None
        if cfg.eval_every:
            from vlmo_large.training.heldout_evaluation import HeldOutEvaluator
            evaluate = HeldOutEvaluator(cfg, resolved, tracker)
        Trainer(cfg, resolved, tracker=tracker, evaluate=evaluate).run()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
        state.destroy()
    return 0


def make_tracker(cfg, resolved, config_files):
    """MLflow on rank 0 (a no-op elsewhere): the run's config, DeepSpeed config, preset and layout."""
    import dataclasses

    from vlmo_large.tracking import create_tracker
    rank = int(os.environ.get("RANK", "0"))
    tracker = create_tracker(cfg.output_dir, cfg.tracking_uri, run_name=f"{cfg.preset}-{cfg.stage}", rank=rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": world // (cfg.parallel.tp * cfg.parallel.pp),
              "zero": resolved.ds_config.get("zero_optimization", {}).get("stage", 0)}
    tracker.log_run_setup(config=cfg.to_dict(), ds_config=resolved.ds_config,
                          preset=dataclasses.asdict(resolved.model), layout=layout)
    for path in config_files:
        if path:
            tracker.log_artifact(path)
    return tracker


if __name__ == "__main__":
    sys.exit(main())
