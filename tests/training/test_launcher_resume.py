"""The launcher end to end on the synthetic shards (2 ranks, ZeRO-1): a process killed while
writing a checkpoint leaves it incomplete, and `--resume auto` continues from the last complete
one with the same losses (data position and RNG restored) as the uninterrupted run."""
import json
import os
import shutil

from safetensors.torch import load_file

from tests.conftest import seed_store
from tests.training.conftest import run_torchrun, zero1_launch_args


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_skips_an_interrupted_checkpoint_and_matches(tmp_path, dataset, zero1_launch, store_template):
    run, started = zero1_launch  # the uninterrupted run (a session fixture, read-only)
    started.result()
    full = metrics(run)
    assert [h["step"] for h in full] == [1, 2, 3, 4]
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000002", "step00000004"]
    assert (ckpt / "latest").read_text() == "step00000004"

    # the same directory as if the process had died while writing step 4
    crashed = tmp_path / "crashed"
    shutil.copytree(ckpt, crashed / "checkpoints")
    os.remove(crashed / "checkpoints" / "step00000004" / "COMPLETE")
    seed_store(store_template, crashed / "mlflow.db")
    run_torchrun(zero1_launch_args(crashed, dataset, "--resume", "auto"))
    resumed = metrics(crashed)
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("loss", "itc", "itm", "mlm"):
            assert abs(a[key] - b[key]) < 1e-6, (key, a, b)

    exported = load_file(str(crashed / "export" / "model.safetensors"))
    reference = load_file(str(run / "export" / "model.safetensors"))
    assert exported.keys() == reference.keys()
    assert max((exported[k] - reference[k]).abs().max().item() for k in exported) < 1e-6
    assert json.loads((crashed / "export" / "model_config.json").read_text())["name"] == "tiny"
