"""Train the SentencePiece tokenizer from text files (one sentence or caption per line).

    python tools/train_tokenizer.py corpus1.txt corpus2.txt --out tok.model --vocab-size 64000
"""
from __future__ import annotations

import argparse

from vlmo_large.data.sentencepiece_training import train_sentencepiece
from vlmo_large.data.tokenizer import load_tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="text files, one sentence per line")
    p.add_argument("--out", required=True, help="model path (.model appended when missing)")
    p.add_argument("--vocab-size", type=int, default=64000, help="upper bound on the vocabulary")
    p.add_argument("--cased", action="store_true", help="keep case (default: lower-case)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sampled for training")
    args = p.parse_args(argv)
    path = train_sentencepiece(files=args.files, model_path=args.out, vocab_size=args.vocab_size,
                               lowercase=not args.cased, character_coverage=args.character_coverage,
                               model_type=args.model_type, max_sentences=args.max_sentences)
    tok = load_tokenizer(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, [CLS]={tok.cls_id} [SEP]={tok.sep_id} "
          f"[MASK]={tok.mask_id} [UNK]={tok.unk_id} [PAD]={tok.pad_id}")


if __name__ == "__main__":
    main()
