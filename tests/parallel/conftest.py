import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import randomize_
from vlmo_large.model import build_model


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Plain weights of a randomised tiny model, the common start of every layout-equality test."""
    torch.manual_seed(0)
    model = randomize_(build_model("tiny"), seed=5)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
