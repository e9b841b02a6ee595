"""Bad inputs give one clear line naming the file and tensor; the CLI exits 2 without a traceback;
nothing in a file is executed; vocabularies of another size are refused unless resized; index
entries cannot reach outside their folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from tools.convert_checkpoint import main
from vlmo_large.checkpoint import PlainCheckpoint, import_reference, to_plain
from vlmo_large.config import get_preset
from vlmo_large.formats.io import CheckpointError
from vlmo_large.formats.reference import to_reference
from vlmo_large.model import build_model

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def zero3_copy(zero3_run, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(zero3_run.ckpt, folder)
    return folder, next(p for p in folder.iterdir() if p.is_dir())


def cli_error(capsys, *argv) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_truncated_optimizer_file(zero3_copy, tmp_path, capsys):
    _, tag = zero3_copy
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert str(victim) in cli_error(capsys, "to-plain", tag.parent, tmp_path / "out")


def test_missing_shard_file(zero3_copy, tmp_path, capsys):
    _, tag = zero3_copy
    os.remove(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    err = cli_error(capsys, "to-plain", tag, tmp_path / "out")
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and "missing" in err


def test_checkpoint_of_another_preset(zero3_copy, tmp_path, capsys):
    folder, _ = zero3_copy
    err = cli_error(capsys, "to-plain", folder, tmp_path / "out", "--preset", "base")
    assert "another preset" in err and "tensor '" in err


def test_corrupt_and_incomplete_plain_folders(zero3_run, tmp_path):
    split = tmp_path / "split"
    files = to_plain(str(zero3_run.ckpt), str(split), max_shard_bytes=400_000)
    second = split / files[1]
    second.write_bytes(second.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{second}.*truncated.*tensor '"):
        PlainCheckpoint(str(split))
    os.remove(second)
    with pytest.raises(CheckpointError, match=f"{second} is missing.*tensors, e.g. '"):
        PlainCheckpoint(str(split))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        PlainCheckpoint(str(garbage))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_files_holding_code_are_refused(tmp_path, capsys):
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload()}, bad)
    err = cli_error(capsys, "import-reference", bad, tmp_path / "out", "--preset", "tiny")
    assert str(bad) in err and "weights-only" in err


def test_vocabulary_of_another_size(tmp_path, capsys):
    torch.manual_seed(0)
    small = build_model("tiny", vocab_size=512)
    state = to_reference({k: v.detach() for k, v in small.state_dict().items()})
    torch.save({"model": state}, tmp_path / "vlmo.pt")
    err = cli_error(capsys, "import-reference", tmp_path / "vlmo.pt", tmp_path / "out", "--preset", "tiny")
    assert "word_embeddings" in err and "--resize-vocab" in err
    report = import_reference(str(tmp_path / "vlmo.pt"), str(tmp_path / "out"), get_preset("tiny"), resize=True)
    assert any("1024 rows" in c for c in report.converted)
    words = PlainCheckpoint(str(tmp_path / "out")).get("backbone.text_embeddings.word_embeddings.weight")
    assert words.shape == (1024, 64)
    assert torch.equal(words[:512], small.backbone.text_embeddings.word_embeddings.weight.detach())
    assert words[512:].std() > 0.01  # initialised, not zeros


def test_import_beit_fills_the_vision_path(tmp_path, capsys):
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=64,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
    torch.save({"model": beit.state_dict()}, tmp_path / "beit.pth")
    assert main(["import-beit", str(tmp_path / "beit.pth"), str(tmp_path / "out"), "--preset", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "new (not in the file)" in printed and "experts.text" in printed
    plain = PlainCheckpoint(str(tmp_path / "out"))
    assert torch.equal(plain.get("backbone.blocks.1.experts.imag.fc1.weight"), beit.blocks[1].mlp.fc1.weight.detach())
    assert plain.config().name == "tiny"


def test_cli_exit_status_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "to-plain",
                             str(tmp_path / "nowhere"), str(tmp_path / "out")], capture_output=True, text=True,
                            env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint folder not found: {tmp_path / 'nowhere'}"


@pytest.mark.parametrize("form", ["absolute", "dotdot", "link"])
def test_index_entries_leaving_the_folder_are_refused(tmp_path, form):
    """A valid shard elsewhere on disk must not be loaded through a plain folder's index."""
    from safetensors.torch import save_file

    from vlmo_large.checkpoint.plain import INDEX_NAME
    from vlmo_large.training.initialization import load_init_weights

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"x": torch.ones(2)}, str(elsewhere / "shard.safetensors"))
    folder = tmp_path / "deep" / "plain"
    folder.mkdir(parents=True)
    entry = {"absolute": str(elsewhere / "shard.safetensors"), "dotdot": "../../elsewhere/shard.safetensors",
             "link": "linked.safetensors"}[form]
    if form == "link":
        os.symlink(elsewhere / "shard.safetensors", folder / "linked.safetensors")
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {"x": entry}}))
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}: entry 'x' -> .*outside the checkpoint folder"):
        PlainCheckpoint(str(folder))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_init_weights(build_model("tiny"), str(folder))
