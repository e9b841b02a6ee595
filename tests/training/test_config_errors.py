"""Config errors that used to train silently or end in a traceback (issue 11, item 5): each is
refused by the real launcher entry with exit status 2 and exactly one `error:` line on stderr
naming the key or file, before anything is built (the output folder is never created)."""
import json
import signal
import tarfile

import pytest
import torch

from launchers.pretrain import main
from vlmo_large.training.deepspeed_config_check import check_deepspeed_config, known_top_level_keys

ZERO0 = {"zero_optimization": {"stage": 0}}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture
def launch(tmp_path, monkeypatch, capsys):
    """main([...]) in this process as one rank of one; -> the error line (after checking rc 2,
    one stderr line and no output folder)."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    out = tmp_path / "out"

    def run(*overrides, ds=ZERO0, output_dir=out):
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds))
        rc = main(["--ds_config", str(ds_path), "data.source=random", "batch.micro=2", "schedule.steps=4",
                   "schedule.warmup=1", "tracking_uri=none", f"output_dir={output_dir}", *overrides])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
        assert not out.exists(), "nothing may start before the config is accepted"
        return lines[0]

    yield run
    for sig, handler in handlers.items():  # the launcher installs its stop-request handlers first
        signal.signal(sig, handler)


def wordpiece_vocab(path, pieces: int):
    path.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(pieces - len(SPECIALS))]) + "\n")
    return path


def tar_shard(path):
    member = path.parent / "000.txt"
    member.write_text("a caption")
    with tarfile.open(path, "w") as tar:
        tar.add(member, arcname="000.txt")
    return path


# -- accepted silently before -------------------------------------------------------------------
def test_misspelt_deepspeed_key_is_named_with_the_file_and_a_suggestion(launch, tmp_path):
    line = launch(ds={"zero_optimisation": {"stage": 1}})
    assert line == (f"error: {tmp_path / 'ds.json'}: 'zero_optimisation' is not a DeepSpeed config key "
                    "(did you mean 'zero_optimization'?)")


def test_misspelt_zero_key(launch):
    line = launch(ds={"zero_optimization": {"stage": 3, "overlap_com": True}})
    assert line.endswith("'zero_optimization.overlap_com' is not a DeepSpeed config key "
                         "(did you mean 'zero_optimization.overlap_comm'?)")


def test_train_batch_size_disagreeing_with_the_run_configs_batch(launch):
    # before, grad_accum was silently derived as 4 from train_batch_size
    line = launch(ds={"train_batch_size": 8, **ZERO0})
    assert "train_batch_size=8 != micro (2) * grad_accum (1) * data-parallel size (1) = 2" in line


@pytest.mark.parametrize("overrides, message", [
    (["batch.grad_accum=0"], "batch.grad_accum=0 must be at least 1"),
    (["data.mlm_prob=1.5"], "data.mlm_prob=1.5 must lie in (0, 1]"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["schedule.steps=4", "schedule.warmup=10"], "schedule.warmup=10 exceeds schedule.steps=4"),
    (["data.mim_ratio=-1"], "data.mim_ratio=-1.0 must lie in (0, 1)"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas=[0.9, 1.5]: each must lie in [0, 1)"),
    (["optim.eps=-1"], "optim.eps=-1.0 must be positive"),
    (["data.augment=bogus"], "data.augment='bogus' must be one of spec, light, none"),
    (["model.embed_dim=abc"], "config key 'model.embed_dim' must be int, got str 'abc'"),
    (["model.layer_scale_init=big"], "config key 'model.layer_scale_init' must be float or null, got str 'big'"),
    (["model.use_rel_pos_bias=3"], "config key 'model.use_rel_pos_bias' must be bool, got int 3"),
    (["model.embed_dim=66"], "model config 'tiny': model.embed_dim=66 is not divisible by model.num_heads=4"),
    (["model.vl_start=9"], "model config 'tiny': model.vl_start=9 must lie in [0, model.depth=4]"),
    (["model.num_heads=0"], "model config 'tiny': model.num_heads=0 must be at least 1"),
    (["model.attention=fast"], "model.attention must be 'auto', 'sdpa', 'flex' or 'explicit', got 'fast'"),
    (["optim.decay_rule=bert"], "optim.decay_rule='bert' must be one of reference, vlmo_large"),
    (["eval_every=2"], "error: eval_every=2 needs eval.shards or eval.retrieval_json"),
])
def test_out_of_range_or_mistyped_value_names_the_key(launch, overrides, message):
    assert message in launch(*overrides)


def test_unknown_model_key_names_it_and_lists_the_model_configs_fields(launch):
    import dataclasses

    from vlmo_large.config import ModelConfig
    fields = sorted(f.name for f in dataclasses.fields(ModelConfig))
    assert launch("model.num_headz=3") == ("error: unknown config key 'model.num_headz' (known in this section: "
                                           f"{', '.join(fields)})")


def test_optional_model_keys_take_null(launch, tmp_path):
    (tmp_path / "taken").write_text("a file")  # the later output_dir check stops the accepted config
    line = launch("model.layer_scale_init=null", "model.text_dropout=null", output_dir=tmp_path / "taken")
    assert "output_dir" in line


def test_compile_with_zero3_is_refused_with_the_reason(launch):
    # under ZeRO-3 the first compiled block stops at DeepSpeed's pre-forward hook (torch._dynamo Unsupported:
    # "Skip calling `torch.compiler.disable()`d function"; step_bench --zero 3 --compile, DeepSpeed 0.19.8)
    line = launch("model.compile=true", ds={"zero_optimization": {"stage": 3}})
    assert line.startswith("error: model.compile=true with zero_optimization.stage=3: ")
    assert line.endswith("use ZeRO-1 or 2 (as ds_configs/*_zero2_bf16.json) or model.compile=false")


def test_tokenizer_larger_than_the_models_vocabulary(launch, tmp_path):
    vocab = wordpiece_vocab(tmp_path / "vocab.txt", 1100)
    line = launch("data.source=shards", f"data.shards={tar_shard(tmp_path / 'train-000.tar')}",
                  f"data.tokenizer={vocab}")
    assert line == (f"error: data.tokenizer: {vocab} has 1100 pieces but model.vocab_size is 1024 (preset 'tiny'): "
                    "set model.vocab_size=1100 or more, or train the tokenizer with --vocab-size 1024 or less")


def test_tokenizer_that_fits_is_accepted(launch, tmp_path):
    vocab = wordpiece_vocab(tmp_path / "vocab.txt", 1100)
    shard = tar_shard(tmp_path / "train-000.tar")
    (tmp_path / "taken").write_text("a file")  # the check after the tokenizer's stops the run instead
    line = launch("data.source=shards", f"data.shards={shard}", f"data.tokenizer={vocab}", "model.vocab_size=1100",
                  output_dir=tmp_path / "taken")
    assert "output_dir" in line


# -- tracebacks before ----------------------------------------------------------------------------
def test_zero_stage_that_is_not_a_number(launch, tmp_path):
    line = launch(ds={"zero_optimization": {"stage": "three"}})
    assert line == f"error: {tmp_path / 'ds.json'}: zero_optimization.stage must be 0, 1, 2 or 3, got 'three'"


def test_tokenizer_path_that_is_not_a_tokenizer(launch, tmp_path):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"\x00\x01 this is no sentencepiece model")
    line = launch("data.source=shards", f"data.shards={tar_shard(tmp_path / 'train-000.tar')}",
                  f"data.tokenizer={bogus}")
    assert line.startswith(f"error: data.tokenizer: {bogus} is not a SentencePiece model or WordPiece vocab.txt (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_a_machine_without_gpu(launch, tmp_path):
    line = launch(ds={"fp16": {"enabled": True}, **ZERO0})
    assert line.startswith(f"error: {tmp_path / 'ds.json'}: fp16.enabled is true but this machine has no GPU")


def test_shards_that_are_not_a_tar(launch, tmp_path):
    shard = tmp_path / "train-000.tar"
    shard.write_text("id,caption\n1,a red circle\n")
    line = launch("data.source=shards", f"data.shards={shard}", "stage=mim")
    assert line.startswith(f"error: data.shards: {shard} is not a tar file (")


def test_output_dir_that_is_a_file(launch, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert launch(output_dir=taken) == f"error: output_dir: {taken} is a file, not a directory"


def test_output_dir_below_a_file(launch, tmp_path):
    # also fails for root, which chmod would not stop
    taken = tmp_path / "taken"
    taken.write_text("a file")
    line = launch(output_dir=taken / "run")
    assert line == f"error: output_dir: cannot create {taken / 'run'}: {taken} is a file, not a directory"


def test_output_dir_where_nothing_can_be_written(launch):
    line = launch(output_dir="/proc/vlmo_large_run")  # /proc takes no new entries, not even from root
    assert line.startswith("error: output_dir: cannot write to /proc: ")


def test_checkpoint_dir_below_a_file(launch, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert "checkpoint.dir: cannot create" in launch(f"checkpoint.dir={taken / 'ckpt'}")


# -- what DeepSpeed accepts stays accepted ---------------------------------------------------------
def test_the_projects_deepspeed_configs_pass_and_known_keys_come_from_deepspeed():
    import glob
    import os

    from tests.training.conftest import REPO
    for path in sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))):
        with open(path) as f:
            ds = json.load(f)
        if torch.cuda.is_available() or not ds.get("fp16", {}).get("enabled"):
            check_deepspeed_config(ds, path)
    keys = known_top_level_keys()
    assert {"zero_optimization", "bf16", "fp16", "train_batch_size", "gradient_clipping", "optimizer",
            "activation_checkpointing", "tensorboard", "pipeline", "communication_data_type"} <= keys
    check_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})  # bf16 trains on a CPU


def test_sentencepiece_tokenizer_larger_than_the_models_vocabulary(launch, tmp_path):
    """The tokenizer tool's own format; the issue's case: a few hundred pieces against a smaller model."""
    from vlmo_large.data import load_tokenizer
    from vlmo_large.data.sentencepiece_training import train_sentencepiece
    words = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in "lmnrstxz"]
    texts = [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)) for i in range(400)]
    model = train_sentencepiece(texts, model_path=str(tmp_path / "tok"), vocab_size=400)
    pieces = load_tokenizer(model).vocab_size
    assert pieces > 256
    line = launch("data.source=shards", f"data.shards={tar_shard(tmp_path / 'train-000.tar')}",
                  f"data.tokenizer={model}", "model.vocab_size=256")
    assert line.startswith(f"error: data.tokenizer: {model} has {pieces} pieces but model.vocab_size is 256 ")
