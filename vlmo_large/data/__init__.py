"""Data: tokenizers, shard packing, the synthetic dataset, and the resumable webdataset loader."""
from vlmo_large.data.loader import StreamLoader, build_loader, merge_loader_states
from vlmo_large.data.tokenizer import load_tokenizer

__all__ = ["StreamLoader", "build_loader", "load_tokenizer", "merge_loader_states"]
