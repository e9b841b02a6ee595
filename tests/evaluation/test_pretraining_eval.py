"""evaluate_pretraining where the answer is known: an oracle model with exact, hand-countable
outputs, and the real tiny model with its heads pinned to constant answers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.evaluation import encode_for_retrieval, evaluate_pretraining, retrieval_metrics
from vlmo_large.model import build_model

VOCAB = 16


class OracleBackbone(nn.Module):
    """Image k is a constant image of value k; a caption names its image with token ids[:, 1].
    Features are one-hot, the ITM "logits" say whether the caption names the image, and the MLM
    logits at a text position are the one-hot of the input token there (so MLM predicts its input)."""

    def encode_image(self, images):
        cls = F.one_hot(images[:, 0, 0, 0].long(), VOCAB).float()
        return torch.stack([cls, cls], 1)

    def encode_text(self, ids, mask):
        return F.one_hot(ids[:, :2], VOCAB).float().flip(1)  # first token: one-hot of the named image

    def encode_pair(self, ids, mask, images):
        text = F.one_hot(ids, VOCAB).float()
        match = (ids[:, 1] == images[:, 0, 0, 0].long()).float()
        text[:, 0, :2] = torch.stack([1 - match, match], -1)
        image_tokens = self.encode_image(images) * 100  # would win any argmax if sliced by mistake
        return torch.cat([text, image_tokens], 1)


class OracleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = OracleBackbone()
        self.cfg = type("Cfg", (), {"vocab_size": VOCAB})()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.itc = lambda image_cls, text_cls: (F.normalize(image_cls, dim=-1), F.normalize(text_cls, dim=-1))
        self.pooler = lambda hidden: hidden[:, 0]
        self.itm_head = lambda pooled: pooled[:, :2]
        self.mlm_head = lambda hidden: hidden


def oracle_batch(image_ids, named_ids, index=None, seed=0, text_len=8):
    gen = torch.Generator().manual_seed(seed)
    size = len(image_ids)
    images = torch.tensor(image_ids, dtype=torch.float)[:, None, None, None].expand(size, 3, 4, 4).clone()
    ids = torch.randint(2, VOCAB, (size, text_len), generator=gen)
    ids[:, 0] = 1
    ids[:, 1] = torch.tensor(named_ids)
    mlm_ids = ids.clone()
    mlm_ids[:, 2:5] = torch.randint(2, VOCAB, (size, 3), generator=gen)  # "masked" inputs
    labels = torch.full_like(ids, -100)
    labels[:, 2] = mlm_ids[:, 2]                # predicted right
    labels[:, 3] = (mlm_ids[:, 3] + 1) % VOCAB  # predicted wrong
    labels[:, 4] = mlm_ids[:, 4]                # predicted right
    batch = {"image": images, "text_ids": ids, "text_mask": torch.ones_like(ids), "mlm_ids": mlm_ids,
             "mlm_labels": labels}
    if index is not None:
        batch["index"] = torch.tensor(index)
    return batch


def test_oracle_known_answers():
    # Eight images in two batches; caption 5 names image 0 (wrong, and image 0 is in the other batch,
    # so no rotated negative of batch 2 can accidentally match).
    batches = [oracle_batch([0, 1, 2, 3], [0, 1, 2, 3], seed=0), oracle_batch([4, 5, 6, 7], [4, 0, 6, 7], seed=1)]
    got = evaluate_pretraining(OracleModel(), batches)
    # Image 5's only caption is orthogonal to it and ties with 7 others: rank 7. Image 0 ties its
    # gold caption with caption 5: rank 1. Caption 5's gold image 5 scores 0, below image 0 and tied
    # with the 6 others: rank 7. Everything else ranks first.
    want = {"tr_r1": 6 / 8, "tr_r5": 7 / 8, "tr_r10": 1.0, "ir_r1": 7 / 8, "ir_r5": 7 / 8, "ir_r10": 1.0,
            "chance_r1": 1 / 8, "num_images": 8.0, "num_texts": 8.0,
            "itm_pos_acc": 7 / 8, "itm_neg_acc": 1.0, "itm_pos_neg_acc": 15 / 16,
            "mlm_acc": 2 / 3, "num_mlm_tokens": 24.0}
    assert got == pytest.approx(want)
    assert all(type(v) is float for v in got.values())


def test_several_captions_per_image_are_one_image_and_never_a_negative():
    # Image 2 appears three times (same "index") with three captions, across both batches.
    batches = [oracle_batch([2, 2, 3, 4], [2, 2, 3, 4], index=[12, 12, 13, 14], seed=0),
               oracle_batch([2, 5], [2, 5], index=[12, 15], seed=1)]
    for seed in range(4):  # different rotations: a same-image "negative" would be called a match
        got = evaluate_pretraining(OracleModel(), batches, seed=seed)
        assert got["num_images"] == 4.0 and got["num_texts"] == 6.0
        assert got["itm_neg_acc"] == 1.0 and got["itm_pos_acc"] == 1.0
        assert got["tr_r1"] == got["ir_r1"] == 1.0


def test_without_mlm_labels_or_negatives_those_metrics_are_absent():
    batch = oracle_batch([3], [3])
    del batch["mlm_ids"], batch["mlm_labels"]
    got = evaluate_pretraining(OracleModel(), [batch])
    assert "mlm_acc" not in got and "itm_pos_neg_acc" not in got and got["itm_pos_acc"] == 1.0


def tiny_batches(cfg, sizes=(4, 3)):
    batches = []
    for n, size in enumerate(sizes):
        ids, mask = text_batch(cfg, size, seed=n, lengths=[5 + 3 * i for i in range(size)])
        labels = torch.full_like(ids, -100)
        labels[:, 1:4] = 7                       # predicted right by the pinned head
        labels[:, 4] = 8                         # predicted wrong
        labels[:, 1:5] = labels[:, 1:5].masked_fill(mask[:, 1:5] == 0, -100)
        batches.append({"image": image_batch(cfg, size, seed=n), "text_ids": ids, "text_mask": mask,
                        "mlm_ids": ids, "mlm_labels": labels})
    return batches


def test_tiny_model_with_pinned_heads():
    model = randomize_(build_model("tiny"))
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([0.0, 1.0]))  # always "match"
        model.mlm_head.decoder.weight.zero_()
        model.mlm_head.decoder.bias.zero_()
        model.mlm_head.decoder.bias[7] = 1.0                 # always token 7
    batches = tiny_batches(model.cfg)
    got = evaluate_pretraining(model, batches)
    assert got["itm_pos_acc"] == 1.0 and got["itm_neg_acc"] == 0.0
    assert got["itm_pos_neg_acc"] == pytest.approx(7 / 14)  # 7 positives, 7 rotated negatives
    assert got["mlm_acc"] == pytest.approx(3 / 4) and got["num_mlm_tokens"] == 28.0


def test_tiny_model_retrieval_is_the_dual_encoder_and_runs_in_eval_mode():
    model = randomize_(build_model("tiny", drop_path_rate=0.5)).train()  # train mode would be random
    batches = tiny_batches(model.cfg)
    got = evaluate_pretraining(model, batches)
    assert model.training  # restored
    assert evaluate_pretraining(model, batches) == got  # deterministic: ran in eval mode
    model.eval()
    with torch.no_grad():  # independent: the backbone and heads called directly
        feats = [model.itc(model.backbone.encode_image(b["image"])[:, 0],
                           model.backbone.encode_text(b["text_ids"], b["text_mask"])[:, 0]) for b in batches]
    image_feats = torch.cat([f[0] for f in feats])
    text_feats = torch.cat([f[1] for f in feats])
    want = retrieval_metrics(image_feats, text_feats, torch.arange(7))
    assert {k: got[k] for k in want} == pytest.approx(want)
    with torch.no_grad():
        image_again, _ = encode_for_retrieval(model, batches[0]["image"], batches[0]["text_ids"], batches[0]["text_mask"])
    assert torch.allclose(image_again, feats[0][0], atol=1e-6)


def test_max_batches_limits_the_split():
    model = randomize_(build_model("tiny"))
    got = evaluate_pretraining(model, tiny_batches(model.cfg, sizes=(2, 2, 2)), max_batches=2)
    assert got["num_texts"] == 4.0


def test_bf16_model_inside_a_wrapper():
    model = randomize_(build_model("tiny")).to(torch.bfloat16)
    engine = nn.Module()
    engine.module = model  # as DeepSpeed's engine holds the model
    got = evaluate_pretraining(engine, tiny_batches(model.cfg))
    assert got["num_texts"] == 7.0 and 0.0 <= got["tr_r1"] <= 1.0 and got["num_mlm_tokens"] == 28.0
