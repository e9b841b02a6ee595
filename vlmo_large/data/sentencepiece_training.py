"""Train a SentencePiece model with the special tokens VLMo needs.

Id layout (fixed, the model and the MLM masking rely on it):
    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]   5.. learned pieces
Word boundaries come from SentencePiece's "▁" prefix (a piece starting with it begins a word), so
whole-word masking needs no side table; `split_by_whitespace` stays on to keep pieces inside words.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

SPECIAL_PIECES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def train_sentencepiece(texts: Iterable[str] | None = None, *, files: Sequence[str] = (),
                        model_path: str, vocab_size: int = 32000, lowercase: bool = True,
                        character_coverage: float = 0.9995, model_type: str = "unigram",
                        max_sentences: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000) -> str:
    """Train from in-memory `texts` and/or text `files` (one sentence per line); write
    `<model_path>` (".model" appended when missing) and return its path.

    `vocab_size` is a ceiling (hard_vocab_limit off): a small corpus yields fewer pieces instead of
    failing, which keeps tiny synthetic vocabularies valid for any requested size.
    """
    if not model_path.endswith(".model"):
        model_path += ".model"
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    sentences = list(texts or [])
    for path in files:
        with open(path, "rb") as f:
            sentences.extend(line.decode("utf-8", "replace").strip() for line in f)
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type=model_type, character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
        bos_piece=SPECIAL_PIECES["cls"], eos_piece=SPECIAL_PIECES["sep"],
        user_defined_symbols=[SPECIAL_PIECES["mask"]],
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size, num_threads=os.cpu_count() or 1,
        minloglevel=2)
    with open(model_path, "wb") as f:
        f.write(model.getvalue())
    return model_path
