"""`--init` reads a DeepSpeed checkpoint dir (weights-only reader), an export dir and a weights file
to the same tensors, and a wrong path is one clear error."""
import pytest
import torch
from safetensors.torch import load_file

from vlmo_large.formats.io import CheckpointError
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.model import build_model
from vlmo_large.training.initialization import load_init_weights


@pytest.fixture(scope="module")
def trained(deepspeed_launch):
    """A launcher run's output folder: a ZeRO-3 DeepSpeed checkpoint of two ranks and its export."""
    return deepspeed_launch[0]


@pytest.mark.parametrize("source", ["checkpoints", "export", "export/model.safetensors"])
def test_every_source_gives_the_trained_weights(trained, source):
    reference = split_tables(load_file(str(trained / "export" / "model.safetensors")))
    torch.manual_seed(123)
    model = build_model("tiny")
    report = load_init_weights(model, str(trained / source))
    assert report.missing == [] and report.unexpected == []
    state = model.state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_a_path_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_init_weights(build_model("tiny"), str(tmp_path))


@pytest.mark.parametrize("case", ["manifest", "foreign_names", "corrupt_latest", "bad_config"])
def test_every_init_problem_is_a_checkpoint_error(tmp_path, case):
    """Each is one CheckpointError naming the path (the launcher prints it as one line, exit 2)."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path / case
    folder.mkdir()
    if case == "manifest":  # a sharded folder whose manifest lacks keys (was a KeyError)
        (folder / "sharded.json").write_text(json.dumps({"stage_of": {}}))
    elif case == "foreign_names":  # would load nothing at all, silently (reference names convert: test_resize_at_load)
        save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    elif case == "corrupt_latest":  # a DeepSpeed dir whose `latest` names no tag
        (folder / "latest").write_text("step00000009")
    else:  # a plain folder whose config.json is not JSON
        save_file({k: v.contiguous() for k, v in build_model("tiny").state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(folder)):
        load_init_weights(build_model("tiny"), str(folder))
