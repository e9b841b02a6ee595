import io
import os
import tarfile

import pytest

from vlmo_large.data import load_tokenizer
from vlmo_large.data.synthetic import make_synthetic

SMALL = dict(num_pairs=240, num_images=120, num_texts=120, num_val=20, num_retrieval=10,
             num_vqa_images=20, num_nlvr2=20, samples_per_shard=30)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), **SMALL)


@pytest.fixture(scope="session")
def tokenizer(synthetic):
    return load_tokenizer(synthetic["tokenizer"])


def tar_records(path: str) -> dict[str, dict[str, bytes]]:
    """Independent reader (plain tarfile): key -> {extension: bytes}, in file order."""
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            records.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return records


def folder_records(folder, prefix: str) -> dict[str, dict[str, bytes]]:
    """tar_records of every `<prefix>*.tar` in `folder`, in name order."""
    records: dict[str, dict[str, bytes]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".tar"):
            records.update(tar_records(os.path.join(folder, name)))
    return records


def png(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()
