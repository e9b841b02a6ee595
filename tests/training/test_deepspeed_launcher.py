"""`deepspeed launchers/pretrain.py ...`, the way users start it: two CPU ranks through DeepSpeed's
own launcher (it passes --local_rank) train and export, and rank 0 alone writes the metrics."""
import json

import mlflow


def test_deepspeed_launcher_two_ranks(deepspeed_launch):
    out, _ = deepspeed_launch  # (the session fixture asserts exit status 0)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert (out / "export" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"  # rank 0's tracker, in the store seeded before the launch
