"""Two real ranks (torchrun, gloo, ZeRO-3, tiny) against independent single-process computations."""
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.training.common import GLOBAL_BATCH, ITM_TRIALS, fresh_heads, itc_inputs
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.model import build_model
from vlmo_large.training.freezing import is_trainable

WORLD = 2


def _load(out, name):
    return torch.load(out / f"{name}.pt", weights_only=False)


def test_global_itc_equals_single_process_on_concatenated_batch(multi_rank_results):
    got = _load(multi_rank_results, "itc")
    heads = fresh_heads()
    images, texts = itc_inputs()
    img, txt = heads(images, texts)
    logits = heads.logit_scale.exp() * img @ txt.t()  # the full global matrix, written out
    target = torch.arange(GLOBAL_BATCH)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    loss.backward()
    assert abs(got["loss"] - loss.item()) < 1e-6
    for name, param in heads.named_parameters():
        torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_itm_negatives_are_never_the_positive_and_come_from_every_rank(multi_rank_results):
    per_rank = _load(multi_rank_results, "itm")
    B = GLOBAL_BATCH // WORLD
    for rank, draws in enumerate(per_rank):
        assert len(draws) == ITM_TRIALS
        positives = torch.arange(B) + rank * B
        seen_other_rank = set()
        for d in draws:
            for key in ("image_for_text", "text_for_image"):
                assert not (d[key] == positives).any(), f"rank {rank} drew the positive as {key}"
                seen_other_rank |= {i for i in d[key].tolist() if i // B != rank}
            # the fused pairs hold the gathered samples the indices name (values = global index)
            assert torch.equal(d["image"][:B, 0, 0, 0], positives.float())
            assert torch.equal(d["image"][B:2 * B, 0, 0, 0], d["image_for_text"].float())
            assert torch.equal(d["text_ids"][2 * B:, 0], 100 + d["text_for_image"])
            assert d["labels"].tolist() == [1] * B + [0] * 2 * B
        assert seen_other_rank, f"rank {rank} never drew a negative from the other rank"


def _losses(history):
    return [h["loss"] for h in history]


def test_restart_gives_the_same_losses_as_an_uninterrupted_run(multi_rank_results):
    t = _load(multi_rank_results, "training")
    full, first, second = _losses(t["full"]), _losses(t["first"]), _losses(t["second"])
    assert len(full) == 4 and len(first) == 2 and len(second) == 2
    torch.testing.assert_close(torch.tensor(first + second, dtype=torch.float64),
                               torch.tensor(full, dtype=torch.float64), rtol=0, atol=1e-6)
    restarted = multi_rank_results / "restart" / "checkpoints"
    assert sorted(p.name for p in restarted.glob("step*")) == ["step00000002", "step00000004"]


def test_training_loss_decreases(multi_rank_results):
    losses = _losses(_load(multi_rank_results, "training")["overfit"])
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_stage2_freezing_leaves_frozen_weights_bit_identical(multi_rank_results):
    exported = split_tables(load_file(str(multi_rank_results / "text_mlm" / "export" / "model.safetensors")))
    torch.manual_seed(1)  # the run's seed: the trainer's initial weights, built here independently
    initial = build_model("tiny").state_dict()
    assert set(exported) == set(initial)
    frozen = [n for n in initial if not is_trainable("text_mlm", n)]
    trained = [n for n in initial if is_trainable("text_mlm", n)]
    assert any("attn.qkv" in n for n in frozen) and any("experts.imag" in n for n in frozen)
    for name in frozen:
        assert torch.equal(exported[name], initial[name]), f"frozen {name} changed"
    for name in ("backbone.text_embeddings.word_embeddings.weight", "backbone.blocks.0.experts.text.fc1.weight",
                 "mlm_head.decoder.weight"):
        assert name in trained and not torch.equal(exported[name], initial[name]), f"{name} did not train"
