"""Shards read through URLs (webdataset's opener): the same batches as the local files, exact resume."""
import functools
import http.server
import os
import stat
import threading

import pytest
import torch
from braceexpand import braceexpand

from vlmo_large.data import build_loader
from vlmo_large.data.shard_list import expand_shards


def _loader(shards, tokenizer, workers=2, world=2):
    return build_loader("image_text", shards, 8, tokenizer=tokenizer, image_size=64, max_text_len=32, rank=0,
                        world_size=world, num_workers=workers, seed=3, shuffle_buffer=16, prefetch_factor=2)


def _same(a, b):
    assert [k for x in a for k in x["keys"]] == [k for x in b for k in x["keys"]]
    for x, y in zip(a, b):
        for name in ("image", "mlm_ids", "text_ids"):
            assert torch.equal(x[name], y[name])


@pytest.fixture(scope="module")
def http_root(synthetic):
    folder = os.path.dirname(synthetic["image_text"]["train"])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _urls(synthetic, http_root, scheme):
    pattern = synthetic["image_text"]["train"]
    if scheme == "pipe":
        return f"pipe:cat {pattern}"
    return f"{http_root}/{os.path.basename(pattern)}"


@pytest.mark.parametrize("scheme", ["pipe", "http"])
def test_url_shards_give_the_batches_of_the_files_and_resume_exactly(synthetic, tokenizer, http_root, scheme):
    pattern = synthetic["image_text"]["train"]
    urls = _urls(synthetic, http_root, scheme)
    assert expand_shards(urls) == list(braceexpand(urls)), "no existence check, no globbing"
    files = list(_loader(pattern, tokenizer))
    remote = _loader(urls, tokenizer)
    got = list(remote)
    assert len(got) == 120 // 8 and remote.skip_counts() == {}
    _same(got, files)
    first = _loader(urls, tokenizer)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 6:
            break
    resumed = _loader(urls, tokenizer)
    resumed.load_state_dict(first.state_dict())
    _same(head + list(resumed), files)


def test_s3_urls_go_through_the_aws_cli_and_a_missing_url_is_counted(synthetic, tokenizer, http_root, tmp_path,
                                                                     monkeypatch):
    """A stand-in `aws` on PATH serves s3://bucket/<name> from the shard folder."""
    folder, name = os.path.split(synthetic["image_text"]["train"])
    fake = tmp_path / "aws"
    fake.write_text(f'#!/bin/sh\n# aws s3 cp s3://bucket/<name> -\nexec cat "{folder}/${{3#s3://bucket/}}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    files = list(_loader(synthetic["image_text"]["train"], tokenizer, workers=0))
    _same(list(_loader(f"s3://bucket/{name}", tokenizer, workers=0)), files)
    shards = [f"{http_root}/no-such-shard.tar", "pipe:exit 3"] + expand_shards(synthetic["image_text"]["train"])
    loader = _loader(shards, tokenizer, workers=0, world=1)
    list(loader)
    assert loader.skip_counts() == {"missing_shard": 2}
