"""Train VLMo: a pretraining stage (mim, text_mlm, vl) or a fine-tuning task (vqa, nlvr2, retrieval),
from a run config and a DeepSpeed config.

    deepspeed launchers/pretrain.py --ds_config ds_configs/cpu_fp32.json --config run.yaml schedule.steps=50
    torchrun --nproc_per_node 2 launchers/pretrain.py --ds_config ... --config ... [key=value ...]
    python launchers/pretrain.py --ds_config ... --config ...          # one process
    deepspeed launchers/pretrain.py --ds_config ds_configs/zero2_bf16.json --config configs/finetune/vqa.yaml \
        --init runs/pretrain/export                                      # fine-tune a pretrained export

The run config's `stage` names the task. `--init` starts from any checkpoint this project writes or a
reference VLMo file; fine-tuning adds the task's heads and adapts the image size
(training/initialization.py). The export at the end carries the tokenizer, preprocessing and task
options, so tools/evaluate.py needs nothing else.

Every problem a user can fix (vlmo_large.errors.UserError: config, --init, resume, data, a
busy output folder, divergence, a failed checkpoint write) is reported as one line `error: ...`
on stderr with exit status 2, whenever in the run it happens; config problems before any process
group or model exists. SIGTERM or SIGUSR1 ends the run at the next step boundary with a
checkpoint, exit status 0 and the MLflow run marked KILLED; `--resume auto` continues it.
Torch threads per rank: --threads, else OMP_NUM_THREADS, else the usable cores / ranks on the host
(vlmo_large/cpu_threads.py).
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
    parser.add_argument("--init", default=None, help="weights to start from: an export, plain, sharded or DeepSpeed "
                        "checkpoint, or a reference VLMo file (overrides the run config's init)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: OMP_NUM_THREADS, else usable cores / ranks on the host)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. schedule.steps=100 optim.lr=1e-4")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace):
    from vlmo_large.training.run_config import load_run_config, read_mapping

    overrides = list(args.overrides)
    overrides += [f"init={args.init}"] if args.init else []
    overrides += [f"resume={args.resume}"] if args.resume else []
    cfg = load_run_config(args.config, overrides)
    ds_config = read_mapping(args.ds_config)
    # imported once the files are read: validation imports torch and the model's code (seconds), which
    # a run refused for an unreadable file or an unknown key never needs
    from vlmo_large.training.validation import resolve_run
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg, resolve_run(cfg, ds_config, world_size, ds_path=args.ds_config)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from vlmo_large.errors import UserError

    try:
        return train(args)
    except UserError as exc:
        report_user_error(exc)
        return 2
    finally:
        state = sys.modules.get("vlmo_large.parallel.state")
        if state is not None:  # after reporting: the report may ask rank 0 through the group's store
            state.destroy()


def train(args: argparse.Namespace) -> int:
    """The run; 0 also when a stop request (SIGTERM/SIGUSR1) ended it early with a checkpoint."""
    from vlmo_large.training import preemption
    preemption.install()  # first: a signal during set-up stops the run after its first step
    cfg, resolved = resolve(args)
    from vlmo_large.cpu_threads import apply_threads, choose_threads
    threads, why = choose_threads(os.environ, args.threads)
    apply_threads(threads)
    from vlmo_large.cpu_memory import retain_freed_memory_on_cpu
    retain_freed_memory_on_cpu()
    lock = lock_output_dir(cfg.output_dir)  # noqa: F841 (held until this function returns)
    if os.environ.get("RANK", "0") == "0":
        print(f"threads: {threads} torch threads per rank ({why}); set OMP_NUM_THREADS or --threads to change",
              flush=True)
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
        trainer = Trainer(cfg, resolved, tracker=tracker, evaluate=evaluate)
        trainer.run()
        status = "KILLED" if trainer.stopped_by else "FINISHED"  # KILLED: a resumed run continues it
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    return 0


def lock_output_dir(output_dir: str):
    """Rank 0 takes the output folder's lock before anything heavy is built; every rank learns the
    outcome (one broadcast), so all ranks of a refused run exit with the same one line."""
    import torch.distributed as dist

    from vlmo_large.errors import UserError
    from vlmo_large.parallel import state
    from vlmo_large.training.output_lock import OutputLock

    state.init_distributed()
    lock, refusal = None, [None]
    if dist.get_rank() == 0:
        lock = OutputLock(output_dir)
        try:
            lock.acquire()
        except UserError as exc:
            refusal = [str(exc)]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise UserError(refusal[0])
    return lock


def report_user_error(exc: Exception) -> None:
    """`error: <message>` on stderr once: by rank 0, or by another rank when rank 0 did not fail
    too (checked through the process group's store, when there is one)."""
    rank = int(os.environ.get("RANK", "0"))
    store = _group_store()
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if store is not None:
            store.set(_REPORTED, "1")
        return
    if store is None:
        return  # before the process group exists: every rank has the same config, rank 0 said it
    from datetime import timedelta
    try:
        store.wait([_REPORTED], timedelta(seconds=15))
        return  # rank 0 failed the same way and said so
    except Exception:  # timeout, or rank 0 gone: say it here (twice at worst, never not at all)
        print(f"error: {exc} (rank {rank})", file=sys.stderr, flush=True)


_REPORTED = "vlmo_large/user_error_reported"


def _group_store():
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized():
        return None
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def make_tracker(cfg, resolved, config_files):
    """MLflow: rank 0 logs the run (continued on resume), each node's local rank 0 its system metrics."""
    from vlmo_large.tracking.run_tracker import tracker_for_run
    return tracker_for_run(cfg, resolved, config_files)


if __name__ == "__main__":
    sys.exit(main())
