"""Random batches with the data pipeline's keys and shapes, for tests, benchmarks and smoke runs.

Batch i of rank r is a pure function of (seed, r, i), and the position is resumable like the
real loader's (state_dict / load_state_dict), so restart tests need no shards.
"""
from __future__ import annotations

import torch

from vlmo_large.config import ModelConfig
from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.data.vqa_targets import soft_targets, target_tensor

VQA_V2_ANSWERS = 3129  # the reference's VQA v2 answer vocabulary size (the default classifier width)


def _fine_tuning_fields(kind: str, batch: int, gen: torch.Generator, num_answers: int) -> dict:
    """vqa: soft targets and human answers drawn as the loader makes them (10 answers from 3 candidates
    per question, answer k of the vocabulary named str(k)); nlvr2: labels."""
    if kind == "nlvr2":
        return {"nlvr2_labels": torch.randint(0, 2, (batch,), generator=gen)}
    candidates = torch.randint(0, num_answers, (batch, 3), generator=gen)
    picks = candidates.gather(1, torch.randint(0, 3, (batch, 10), generator=gen))
    answers = [[str(k) for k in row] for row in picks.tolist()]
    vocabulary = {str(k): k for k in set(picks.flatten().tolist())}
    return {"vqa_targets": target_tensor([soft_targets(a, vocabulary) for a in answers], num_answers),
            "qid": torch.arange(batch), "vqa_answers": answers}


def random_batch(kind: str, cfg: ModelConfig, batch: int, gen: torch.Generator, mlm_prob: float = 0.15,
                 mim_ratio: float = 0.4, num_answers: int = VQA_V2_ANSWERS) -> dict:
    out = {}
    if kind != "text":
        out["image"] = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    if kind == "nlvr2":
        out["image2"] = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    if kind == "image":
        out["mim_mask"] = torch.rand(batch, cfg.num_patches, generator=gen) < mim_ratio
        return out
    T = cfg.max_text_len
    ids = torch.randint(5, cfg.vocab_size, (batch, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    if kind in ("vqa", "nlvr2"):  # the fine-tuning kinds have no MLM fields
        return {**out, "text_ids": ids, "text_mask": mask, **_fine_tuning_fields(kind, batch, gen, num_answers)}
    scores = torch.rand(batch, T, generator=gen).masked_fill(~mask.bool(), 2.0)
    picked = scores < mlm_prob
    # at most the real masking's cap per sample (the loss's fixed slot count): the lowest scores win
    picked &= scores.argsort(dim=1, stable=True).argsort(dim=1) < max_masked_tokens(T, mlm_prob)
    picked[:, 1] |= ~picked.any(1)  # at least one MLM target per sample
    out.update(text_ids=ids, text_mask=mask, mlm_ids=torch.where(picked, torch.full_like(ids, 4), ids),
               mlm_labels=torch.where(picked, ids, torch.full_like(ids, -100)))
    return out


class RandomBatches:
    def __init__(self, kind: str, cfg: ModelConfig, batch_size: int, seed: int = 0, rank: int = 0,
                 mlm_prob: float = 0.15, mim_ratio: float = 0.4, distinct: int = 0,
                 num_answers: int = VQA_V2_ANSWERS):
        self.distinct = distinct  # > 0: cycle over this many batches (an overfitting check)
        self.kind, self.cfg, self.batch_size, self.seed, self.rank = kind, cfg, batch_size, seed, rank
        self.mlm_prob, self.mim_ratio, self.num_answers = mlm_prob, mim_ratio, num_answers
        self.index = 0

    def __iter__(self):
        while True:
            index = self.index % self.distinct if self.distinct else self.index
            gen = torch.Generator().manual_seed((self.seed * 7919 + self.rank) * 1_000_003 + index)
            self.index += 1
            yield random_batch(self.kind, self.cfg, self.batch_size, gen, self.mlm_prob, self.mim_ratio,
                               self.num_answers)

    def state_dict(self) -> dict:
        return {"index": self.index, "rank": self.rank, "seed": self.seed}

    def load_state_dict(self, saved: dict) -> None:
        self.index = saved["index"]

    def set_epoch(self, epoch: int) -> None:
        pass

    def skip_counts(self) -> dict:
        return {}
