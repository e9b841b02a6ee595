"""ITM hard-negative images travel by all-to-all (only the drawn ones), with the same result as
indexing the whole global batch on one process: two real ranks (torchrun, gloo; the launch of
dist_worker.py, shared with test_multi_rank.py)."""
import pytest
import torch

from tests.training.common import GLOBAL_BATCH, ITM_TRIALS, itm_inputs
from tests.training.itm_exchange_worker import global_rows, wanted_rows
from vlmo_large.parallel.collectives import gather_global_rows
from vlmo_large.tasks.losses import sample_hard_negatives

WORLD = 2


@pytest.fixture(scope="module")
def ranks(multi_rank_results):
    """What each rank of dist_worker.py's launch recorded (itm_exchange_worker.py)."""
    return [torch.load(multi_rank_results / f"itm_exchange_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_fetched_rows_equal_indexing_the_concatenated_batch(ranks):
    B = GLOBAL_BATCH // WORLD
    for rank, saved in enumerate(ranks):
        assert len(saved["rows"]) == 24
        for item in saved["rows"]:
            wanted = wanted_rows(item["trial"], rank, B)
            assert torch.equal(item["wanted"], wanted)
            expected = global_rows(item["trial"], item["dtype"])[wanted]
            assert item["got"].dtype == item["dtype"] and torch.equal(item["got"], expected)


def test_itm_pairs_equal_one_process_and_never_all_gather_images(ranks):
    B = GLOBAL_BATCH // WORLD
    inputs = [itm_inputs(r, WORLD) for r in range(WORLD)]
    all_images = torch.cat([batch["image"] for batch, _, _ in inputs])
    all_ids = torch.cat([batch["text_ids"] for batch, _, _ in inputs])
    for rank, saved in enumerate(ranks):
        batch, i2t, t2i = inputs[rank]
        positives = torch.arange(B) + rank * B
        for trial, pairs in enumerate(saved["pairs"][:ITM_TRIALS]):
            gen = torch.Generator().manual_seed(1000 * trial + rank)  # the same draws, in the same order
            image_for_text = sample_hard_negatives(t2i, positives, gen)
            text_for_image = sample_hard_negatives(i2t, positives, gen)
            assert torch.equal(pairs["image_for_text"], image_for_text)
            assert torch.equal(pairs["text_for_image"], text_for_image)
            assert torch.equal(pairs["image"], torch.cat([batch["image"], all_images[image_for_text], batch["image"]]))
            assert torch.equal(pairs["text_ids"], torch.cat([batch["text_ids"], batch["text_ids"],
                                                             all_ids[text_for_image]]))
            assert pairs["labels"].tolist() == [1] * B + [0] * (2 * B)
        # all-gathered: token ids and masks [B, T] and the drawn indices [B]; never the [B, 3, H, W] images
        assert set(saved["gathered_shapes"]) == {(B, 5), (B,)}, saved["gathered_shapes"]


def test_one_process_needs_no_collective():
    local = torch.randn(4, 3)
    wanted = torch.tensor([3, 0, 3])
    assert torch.equal(gather_global_rows(local, wanted), local[wanted])  # no process group exists here
