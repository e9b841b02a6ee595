import os
import shutil
import warnings
from pathlib import Path

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


def seed_store(template: Path, path: Path) -> Path:
    """A copy of the migrated empty store at `path` (e.g. <output_dir>/mlflow.db), unless one is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(template, path)
    return path


def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow store, migrated once per session (what store_template gives, for helpers that
    are no fixtures): launches and trackers start from a copy (seed_store), since a fresh sqlite
    store's migrations take 4-20 s (mostly fsyncs) in every run that makes one."""
    path = tmp_path_factory.getbasetemp() / "mlflow_template" / "mlflow.db"
    if not path.exists():
        from mlflow.tracking import MlflowClient
        path.parent.mkdir(exist_ok=True)
        building = path.with_name("building.db")
        MlflowClient(f"sqlite:///{building}").search_experiments()  # creates and migrates the store
        os.replace(building, path)
    return path


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    return migrated_store(tmp_path_factory)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A small synthetic dataset (image-text, held-out and retrieval splits) shared by launcher tests."""
    from vlmo_large.data.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_pairs=64, num_images=8, num_texts=8,
                          num_val=16, num_retrieval=6, num_vqa_images=2, num_nlvr2=2, samples_per_shard=16)


@pytest.fixture(scope="session")
def zero1_launch(tmp_path_factory, dataset, store_template):
    """The launcher on two ranks (torchrun), ZeRO-1, 4 steps on the shared shards, checkpoints at
    steps 2 and 4 -> (output dir, StartedTorchrun): started when first asked for, so that it trains
    alongside what that test does next; result() waits for it (and may be called again). One run for
    tests/training/test_launcher_resume.py (resumes a copy) and tests/checkpoint/test_resume_safety.py
    (resumes it on one rank), so it lives here, where both directories see one session instance.
    Treat the folder as read-only."""
    from tests.training.conftest import StartedTorchrun, zero1_launch_args
    root = tmp_path_factory.mktemp("zero1_launch")
    out = root / "run"
    seed_store(store_template, out / "mlflow.db")
    started = StartedTorchrun(zero1_launch_args(out, dataset), root / "console", nproc=2, timeout=300)
    yield out, started
    started.proc.kill()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-rank runs of 4 processes (still part of the default suite)")
