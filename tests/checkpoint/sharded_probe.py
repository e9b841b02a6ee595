"""Under torchrun: build tiny at TP=world, `load_sharded_plain(model, argv[1])`, save probe outputs to argv[2]."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.checkpoint.ds_train import probe_outputs  # noqa: E402


def main(path: str, out: str) -> None:
    from vlmo_large.checkpoint import load_sharded_plain
    from vlmo_large.model import build_model
    from vlmo_large.parallel import state

    state.ensure_initialized(tensor_parallel=int(os.environ["WORLD_SIZE"]))
    model = build_model("tiny", tp_group=state.tp_group()).eval()
    report = load_sharded_plain(model, path)
    assert not report.missing
    outputs = probe_outputs(model)
    if dist.get_rank() == 0:
        torch.save(outputs, out)
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
