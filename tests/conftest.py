import os
import warnings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|tp_group is None).*")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmo_large.model import build_model  # noqa: E402


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zeros and ones from init included) distinct random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_model("tiny").eval())


def text_batch(cfg, batch: int = 3, seed: int = 0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    T = cfg.max_text_len
    ids = torch.randint(1, cfg.vocab_size, (batch, T), generator=gen)
    mask = torch.ones(batch, T, dtype=torch.long)
    for b, length in enumerate(lengths or []):
        mask[b, length:] = 0
        ids[b, length:] = 0
    return ids, mask


def image_batch(cfg, batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-rank runs of 4 processes (still part of the default suite)")
