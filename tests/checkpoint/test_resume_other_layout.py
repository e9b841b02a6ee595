"""Resume TP=2 x DP=2 ZeRO-1 (4 processes) as TP=1 x DP=2 ZeRO-3 (2 processes) with the optimizer
state: the losses continue as in the uninterrupted run."""
import os

from tests.checkpoint.conftest import TRAIN, torchrun
from vlmo_large.checkpoint import save_portable


def test_resume_on_another_layout_continues_the_loss_curve(tp2_dp2_run, tmp_path):
    portable = tmp_path / "portable"
    save_portable(str(tp2_dp2_run.ckpt), str(portable))
    assert sorted(os.listdir(portable)) == ["exp_avg", "exp_avg_sq", "training_state.json", "weights"]
    losses_file = tmp_path / "resumed.json"
    torchrun(TRAIN, ["--tp", 1, "--zero", 3, "--steps", 4, "--resume-portable", portable,
                     "--losses", losses_file], nproc=2)
    import json
    with open(losses_file) as f:
        resumed = {int(k): v for k, v in json.load(f).items()}
    full = tp2_dp2_run.losses
    assert sorted(resumed) == [2, 3]
    # steps 2 and 3 need the restored Adam moments and step count: a fresh optimizer gives
    # losses several percent off; reduction order across layouts differs at ~1e-7.
    for step in (2, 3):
        assert abs(resumed[step] - full[step]) <= 1e-5 * abs(full[step]), (step, resumed[step], full[step])
