"""The task registry and the built-in tasks: look-up errors, registration rules, plugins, and each
pretraining stage described as the step ran before tasks existed (passes, terms, data, freezing)."""
import pytest
import torch

from vlmo_large.config import get_preset
from vlmo_large.model import build_model
from vlmo_large.tasks import registry
from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.registry import UnknownTask, get_task, register, task_names
from vlmo_large.training.random_batches import random_batch
from vlmo_large.training.run_config import ConfigError, load_run_config
from vlmo_large.training.validation import resolve_run


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are dropped after it (a plugin module stays registered: it is
    imported once per process, as in a run)."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))


def test_an_unknown_name_is_one_line_listing_the_known_tasks():
    with pytest.raises(UnknownTask) as err:
        get_task("captioning")
    message = str(err.value)
    assert message.startswith("unknown task 'captioning'; known tasks: mim, text_mlm, vl, vqa, nlvr2, retrieval")
    assert "\n" not in message


def test_registration_rules(scratch_registry):
    class Probe(Task):
        name, data_kind, terms = "probe", "text", ("x",)

    assert register(Probe) is Probe and isinstance(get_task("probe"), Probe)
    register(Probe)  # the same class again (a module imported twice) is fine
    assert task_names()[:3] == ("mim", "text_mlm", "vl") and "probe" in task_names()

    class Other(Task):
        name = "probe"
    with pytest.raises(ValueError, match="task 'probe' is already registered by"):
        register(Other)

    class BadKind(Task):
        name, data_kind = "bad_kind", "audio"
    with pytest.raises(ValueError, match="data_kind 'audio' must be one of"):
        register(BadKind)
    with pytest.raises(TypeError, match="register\\(\\) takes a Task with a name"):
        register(object())


def test_built_in_passes_are_the_steps_encoder_calls():
    """The passes STEP_PASSES listed before tasks (step_flops counts FLOPs from them)."""
    assert get_task("mim").passes == (EncoderPass("image"),)
    assert get_task("text_mlm").passes == (EncoderPass("text"),)
    assert get_task("vl").passes == (EncoderPass("image", vl_branch=True, keep="cls"),
                                     EncoderPass("text", vl_branch=True, keep="cls"),
                                     EncoderPass("pair", copies=4, keep="text"))
    kinds = {name: get_task(name).data_kind for name in ("mim", "text_mlm", "vl")}
    assert kinds == {"mim": "image", "text_mlm": "text", "vl": "image_text"}  # the old DATA_KIND
    assert (get_task("vl").min_global_batch, get_task("mim").min_global_batch) == (2, 1)
    assert get_task("vl").trainable is None and get_task("vl").retrieval and not get_task("mim").retrieval


@pytest.mark.parametrize("name", ["mim", "text_mlm", "vl"])
def test_forward_reports_exactly_the_declared_terms(name):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    task = get_task(name)
    batch = random_batch(task.data_kind, cfg, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = task.forward(model, batch, StepContext(seed=1))
    assert set(out) == {"loss", *task.terms}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())


def test_a_plugin_that_fails_to_import_is_one_config_line():
    cfg = load_run_config(None, ["data.source=random", "batch.micro=2", "plugins=[no_such_pkg.my_task]"])
    with pytest.raises(ConfigError) as err:
        resolve_run(cfg, {"zero_optimization": {"stage": 0}}, 1)
    message = str(err.value)
    assert message.startswith("plugins: cannot import 'no_such_pkg.my_task': ModuleNotFoundError") and "\n" not in message


def test_a_plugin_registers_its_task_before_the_stage_is_checked():
    cfg = load_run_config(None, ["data.source=random", "batch.micro=2", "stage=toy_itc",
                                 "plugins=[tests.training.test_task_plugin]"])
    resolved = resolve_run(cfg, {"zero_optimization": {"stage": 0}}, 1)
    assert resolved.micro == 2 and get_task("toy_itc").terms == ("itc",)


def test_a_plugin_task_with_a_pipeline_is_one_config_line():
    cfg = load_run_config(None, ["data.source=random", "batch.micro=2", "stage=toy_itc", "parallel.pp=2",
                                 "plugins=[tests.training.test_task_plugin]"])
    with pytest.raises(ConfigError, match=r"^stage 'toy_itc' with parallel.pp=2: the task implements forward only, "
                                          r"and the pipeline calls its inputs/score \(tasks/base.py\); set parallel.pp=1$"):
        resolve_run(cfg, {"zero_optimization": {"stage": 1}}, 2)
