"""One process: the weight decay DeepSpeed's optimizer applies to each parameter as the launcher
sets training up, through the Trainer (training/engine.py) and the PipelineTrainer
(training/pipeline_engine.py, here with one stage), for each optim.decay_rule.
Writes {rule: {"engine": {name: wd}, "pipeline": {name: wd}}} to argv[1]."""
import json
import sys


def decay_by_name(optimizer, named) -> dict:
    by_id = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in named if id(p) in by_id}


def main(out_path: str) -> None:
    import os

    from tests.training.common import ds_config, run_config
    from vlmo_large.parallel import state
    from vlmo_large.training.pipeline_trainer import PipelineTrainer
    from vlmo_large.training.run_config import DECAY_RULES
    from vlmo_large.training.trainer import Trainer
    from vlmo_large.training.validation import resolve_run

    results = {}
    for rule in DECAY_RULES:
        cfg = run_config(os.path.join(os.path.dirname(out_path), rule),
                         **{"optim.decay_rule": rule, "optim.weight_decay": 0.05})
        resolved = resolve_run(cfg, ds_config(0), 1)
        trainer = Trainer(cfg, resolved)
        trainer.setup()
        results[rule] = {"engine": decay_by_name(trainer.engine.optimizer, trainer.engine.module.named_parameters())}
        trainer = PipelineTrainer(cfg, resolved)
        trainer.setup()
        pipe = trainer.engine.module
        results[rule]["pipeline"] = decay_by_name(trainer.engine.optimizer, pipe.named_parameters())
    with open(out_path, "w") as f:
        json.dump(results, f)
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
