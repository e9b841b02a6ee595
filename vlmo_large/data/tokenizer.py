"""Text tokenizers with one interface: SentencePiece (this project's default) and BERT WordPiece.

Both produce `[CLS] tokens... [SEP]` truncated and padded with id 0 to a fixed length, and report
which ids begin a word, which is all whole-word MLM masking needs. WordPiece (a BERT `vocab.txt`,
the vocabulary of the reference checkpoints) is read by HF `tokenizers`, so those checkpoints can
be fine-tuned here with the ids they were trained on.

    tok = load_tokenizer("tok.model")      # or ".../vocab.txt"
    ids, mask = tok.encode("a red circle", max_len=40)
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from vlmo_large.data.sentencepiece_training import SPECIAL_PIECES


class _Tokenizer:
    """Shared logic; subclasses set the special ids, `vocab_size`, `_pieces` and `_encode_pieces`."""

    pad_id = 0
    vocab_size: int
    cls_id: int
    sep_id: int
    mask_id: int
    unk_id: int
    _word_start: np.ndarray  # bool per id: this piece begins a new word

    @property
    def special_ids(self) -> list[int]:
        return sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id})

    def encode(self, text: str, max_len: int) -> tuple[list[int], list[int]]:
        """Return (ids, mask), both of length `max_len`: [CLS] pieces [SEP] then 0-padding."""
        if max_len < 2:
            raise ValueError("max_len must leave room for [CLS] and [SEP]")
        pieces = self._encode_pieces(text)[: max_len - 2]
        ids = [self.cls_id, *pieces, self.sep_id]
        mask = [1] * len(ids) + [0] * (max_len - len(ids))
        return ids + [self.pad_id] * (max_len - len(ids)), mask

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.encode(t, max_len) for t in texts]
        ids = np.array([p[0] for p in pairs], dtype=np.int64).reshape(len(texts), max_len)
        mask = np.array([p[1] for p in pairs], dtype=np.int64).reshape(len(texts), max_len)
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the non-special ids (padding, [CLS], [SEP] and [MASK] dropped)."""
        special = set(self.special_ids) - {self.unk_id}
        return self._decode([int(i) for i in ids if int(i) not in special])

    def word_starts(self, ids: Sequence[int]) -> np.ndarray:
        """Bool per position: True where a new word (or a special token) begins."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = self._word_start[np.clip(ids, 0, self.vocab_size - 1)]
        return starts | np.isin(ids, self.special_ids)

    def _encode_pieces(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(_Tokenizer):
    """A model trained by `train_sentencepiece` (ids 0-4 = [PAD] [UNK] [CLS] [SEP] [MASK])."""

    def __init__(self, model_path: str):
        with open(model_path, "rb") as f:
            self._model_bytes = f.read()
        self.path = model_path
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        sp = self._sp
        self.vocab_size = sp.vocab_size()
        ids = {name: sp.piece_to_id(piece) for name, piece in SPECIAL_PIECES.items()}
        if ids["pad"] != 0 or len(set(ids.values())) != len(ids) or ids["unk"] != sp.unk_id():
            raise ValueError(f"{self.path}: not a VLMo SentencePiece model (special ids {ids}); "
                             "train it with tools/train_tokenizer.py")
        self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids["unk"], ids["cls"], ids["sep"], ids["mask"]
        self._word_start = np.array([sp.id_to_piece(i).startswith("\u2581")
                                     for i in range(self.vocab_size)], dtype=bool)

    # the processor is a C++ object: ship the model bytes to DataLoader workers instead
    def __getstate__(self):
        return {"path": self.path, "_model_bytes": self._model_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def _encode_pieces(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class WordPieceTokenizer(_Tokenizer):
    """A BERT `vocab.txt` read with HF `tokenizers` (BERT normalisation and pre-tokenisation)."""

    def __init__(self, vocab_path: str, lowercase: bool = True):
        from tokenizers import BertWordPieceTokenizer
        self.path = vocab_path
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
        vocab = self._tok.get_vocab()
        self.vocab_size = len(vocab)
        missing = [p for p in SPECIAL_PIECES.values() if p not in vocab]
        if missing:
            raise ValueError(f"{vocab_path}: missing special tokens {missing}")
        if vocab["[PAD]"] != 0:
            raise ValueError(f"{vocab_path}: [PAD] must have id 0, has {vocab['[PAD]']}")
        self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"])
        self._word_start = np.ones(self.vocab_size, dtype=bool)
        for piece, i in vocab.items():
            self._word_start[i] = not piece.startswith("##")

    def _encode_pieces(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(path: str) -> _Tokenizer:
    """A SentencePiece `.model` file, or a WordPiece `vocab.txt` (or a folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.endswith(".txt"):
        return WordPieceTokenizer(path)
    return SentencePieceTokenizer(path)
