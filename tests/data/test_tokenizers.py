import numpy as np
import pytest
import sentencepiece as spm

from tools.train_tokenizer import main as train_tokenizer_cli
from vlmo_large.data.tokenizer import load_tokenizer

CORPUS = ["A Red Circle on the left", "two small blue squares at the top", "a large green triangle",
          "there is a yellow diamond in the center", "three purple crosses and an orange circle"] * 40


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    train_tokenizer_cli([str(corpus), "--out", str(folder / "tok"), "--vocab-size", "200", "--model-type", "bpe"])
    return str(folder / "tok.model")


def test_sentencepiece_special_ids_truncation_padding(sp_model):
    tok = load_tokenizer(sp_model)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size <= 200
    raw = spm.SentencePieceProcessor(model_file=sp_model)
    pieces = raw.encode("a red circle on the left")
    ids, mask = tok.encode("A RED circle on the left", max_len=16)  # lower-cased by the model
    assert ids == [2, *pieces, 3] + [0] * (16 - len(pieces) - 2)
    assert mask == [1] * (len(pieces) + 2) + [0] * (16 - len(pieces) - 2)
    ids, mask = tok.encode("a red circle on the left", max_len=4)
    assert ids == [2, *pieces[:2], 3] and mask == [1, 1, 1, 1]
    assert tok.decode(tok.encode("two small blue squares", 32)[0]) == "two small blue squares"
    batch_ids, batch_mask = tok.encode_batch(["a red circle", "a"], 8)
    assert batch_ids.shape == (2, 8) and batch_ids.dtype == np.int64 and batch_mask[1].sum() == 3


def test_sentencepiece_word_starts_follow_word_boundaries(sp_model):
    tok = load_tokenizer(sp_model)
    raw = spm.SentencePieceProcessor(model_file=sp_model)
    text = "three purple crosses and an orangecircle"
    ids, _ = tok.encode(text, 24)
    pieces = raw.encode(text, out_type=str)
    expected = [True] + [p.startswith("\u2581") for p in pieces] + [True] * (24 - len(pieces) - 1)
    assert tok.word_starts(ids).tolist() == expected
    assert sum(tok.word_starts(ids)[1:len(pieces) + 1]) == len(text.split())


def test_cased_option_keeps_case(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS))
    train_tokenizer_cli([str(corpus), "--out", str(tmp_path / "cased"), "--vocab-size", "200", "--cased"])
    tok = load_tokenizer(str(tmp_path / "cased.model"))
    assert tok.decode(tok.encode("A Red Circle", 16)[0]) == "A Red Circle"


def test_wordpiece_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circ", "##le", "on", "the", "left", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(str(tmp_path))  # the folder holding vocab.txt
    ids, mask = tok.encode("A red Circle on the left.", max_len=12)
    v = {w: i for i, w in enumerate(vocab)}
    want = [v[w] for w in ["[CLS]", "a", "red", "circ", "##le", "on", "the", "left", ".", "[SEP]"]]
    assert ids == want + [0, 0] and mask == [1] * 10 + [0, 0]
    assert tok.word_starts(ids).tolist() == [True, True, True, True, False] + [True] * 7
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (2, 3, 4, 1)
    assert tok.decode(ids) == "a red circle on the left."


def test_wordpiece_requires_pad_zero(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    with pytest.raises(ValueError, match="PAD"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
