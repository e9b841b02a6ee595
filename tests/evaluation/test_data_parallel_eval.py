"""Under data parallelism (2 gloo ranks, uneven shares of the split) every rank gets the metrics of
the whole split: the same numbers as one process evaluating everything."""
import json
import multiprocessing as mp
import os
import socket

import pytest
import torch

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.evaluation import evaluate_pretraining
from vlmo_large.model import build_model

SIZES = (4, 3, 2)                 # batches of the split
SHARES = {0: [0, 1], 1: [2]}      # rank -> its batches (uneven, as a real last shard)
WHOLE_SPLIT_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "chance_r1", "num_images",
                    "num_texts", "itm_pos_acc", "mlm_acc", "num_mlm_tokens")


def split_batches(cfg):
    batches = []
    for n, size in enumerate(SIZES):
        ids, mask = text_batch(cfg, size, seed=n)
        labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(n)) < 0.3, ids, -100)
        batches.append({"image": image_batch(cfg, size, seed=n), "text_ids": ids, "text_mask": mask,
                        "mlm_ids": ids, "mlm_labels": labels,
                        "index": torch.arange(size) + 100 * n})
    return batches


def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_model("tiny"), seed=3)


def rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from vlmo_large.evaluation.gather import gather_rows, vocab_parallel_argmax
    from vlmo_large.parallel import state
    state.ensure_initialized(1, 1)  # world of 2: data-parallel group of 2
    result = {}
    try:
        model = tiny_model()
        batches = split_batches(model.cfg)
        result["metrics"] = evaluate_pretraining(model, [batches[i] for i in SHARES[rank]])
        # Building blocks on their own: uneven gather, and argmax over a vocabulary split in two.
        rows = gather_rows(torch.full((rank + 2, 3), float(rank)))
        result["gathered"] = rows[:, 0].tolist()
        logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(1)).round(decimals=0)  # many ties
        mine = logits[:, rank * 5:(rank + 1) * 5]
        result["argmax_ok"] = bool(torch.equal(vocab_parallel_argmax(mine, None, rank), logits.argmax(-1)))
    finally:
        state.destroy()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_ranks_report_whole_split_metrics(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    for p in procs:  # a dead gloo peer hangs the other: never leave one behind
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    model = tiny_model()
    whole = evaluate_pretraining(model, split_batches(model.cfg))
    for result in results:
        assert {k: result["metrics"][k] for k in WHOLE_SPLIT_KEYS} == pytest.approx(
            {k: whole[k] for k in WHOLE_SPLIT_KEYS}, abs=1e-6)
        assert result["metrics"]["num_texts"] == sum(SIZES)
        assert result["gathered"] == [0.0, 0.0, 1.0, 1.0, 1.0]
        assert result["argmax_ok"]
    assert results[0]["metrics"] == results[1]["metrics"]
