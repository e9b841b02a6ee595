"""to-plain of a fine-tuned run's DeepSpeed checkpoint (one process, ZeRO-0, random data): the task's
classifier and NLVR2's third modality-type row come out with every other tensor, each equal to the
engine's weight at the save."""
import pytest
import torch

from tests.training.common import ONE_PROCESS_DS, destroy_one_process_group
from vlmo_large.checkpoint import PlainCheckpoint, to_plain
from vlmo_large.training.run_config import load_run_config
from vlmo_large.training.trainer import Trainer
from vlmo_large.training.validation import resolve_run


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    yield
    destroy_one_process_group()


def finetune(out, stage: str) -> dict:
    """Two steps of `stage` on tiny, saved at the end -> the engine's weights (full, fp32). The random
    batches' VQA targets are as wide as the run's classifier (task.num_answers)."""
    cfg = load_run_config(None, ["preset=tiny", f"stage={stage}", "task.num_answers=7", "data.source=random",
                                 "batch.micro=2", "schedule.steps=2", "schedule.warmup=0", "checkpoint.every=0",
                                 "checkpoint.export=false", "tracking_uri=none", "log_every=100",
                                 f"output_dir={out}"])
    trainer = Trainer(cfg, resolve_run(cfg, ONE_PROCESS_DS, 1))
    trainer.run()
    return {n: t.detach().float().clone() for n, t in trainer.engine.module.model.state_dict().items()}


@pytest.mark.parametrize("stage, head", [("vqa", "vqa_classifier"), ("nlvr2", "nlvr2_classifier")])
def test_finetuned_checkpoint_to_plain_holds_every_engine_tensor(tmp_path, stage, head):
    engine = finetune(tmp_path / "run", stage)
    assert f"{head}.3.weight" in engine
    for preset in (None, "tiny"):  # the run's stored config, or a bare preset: the shapes bring the heads
        out = tmp_path / f"plain-{preset}"
        to_plain(str(tmp_path / "run" / "checkpoints"), str(out), preset=preset)
        plain = PlainCheckpoint(str(out))
        state = plain.state_dict()
        assert set(state) == set(engine), set(state) ^ set(engine)
        for name, tensor in engine.items():
            assert torch.equal(state[name], tensor), name
        assert plain.config_dict()["num_modality_types"] == (3 if stage == "nlvr2" else 2)
