"""Reference fine-tuned layouts (issue 14 item 5): a VQA or NLVR2 checkpoint in the reference's names
(its classifier keys, NLVR2's 3-row token_type_embeddings) goes through `import-reference` and
`export-reference` unchanged, and the imported model gives the logits of the model it came from."""
import pytest
import torch

from tests.conftest import randomize_
from tools import convert_checkpoint
from vlmo_large.checkpoint.plain import PlainCheckpoint
from vlmo_large.config import get_preset
from vlmo_large.formats.io import load_into, load_torch_file
from vlmo_large.formats.reference import finetuned_heads, reference_buffers, save_reference_pt, to_reference
from vlmo_large.model import build_model
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.options import TaskOptions
from vlmo_large.tasks.registry import get_task

ANSWERS = 7


def _source(task_name):
    """A randomized tiny model with the task's heads, and a batch of the task."""
    task = get_task(task_name)
    cfg = get_preset("tiny", **getattr(task, "model_overrides", {}))
    model = build_model(cfg, heads=task.heads(cfg, TaskOptions(num_answers=ANSWERS)), seed=0)
    gen = torch.Generator().manual_seed(1)
    T = cfg.max_text_len
    mask = (torch.arange(T)[None] < torch.tensor([T, 6, 17])[:, None]).long()
    batch = {"image": torch.randn(3, 3, 64, 64, generator=gen), "image2": torch.randn(3, 3, 64, 64, generator=gen),
             "text_ids": torch.randint(1, 1024, (3, T), generator=gen) * mask, "text_mask": mask,
             "vqa_targets": torch.rand(3, ANSWERS, generator=gen), "nlvr2_labels": torch.tensor([0, 1, 1])}
    return task, randomize_(model, seed=2).eval(), batch


def _logits(task, model, batch):
    with torch.no_grad():
        outputs = task.encode(model, range(len(task.passes)), task.inputs(batch, StepContext()))
        pooled = torch.cat([model.pooler(outputs[i].x) for i in range(len(task.passes))], -1)
        return getattr(model, f"{task.name}_classifier")(pooled)


@pytest.mark.parametrize("task_name", ["vqa", "nlvr2"])
def test_reference_finetuned_file_round_trips_and_keeps_its_logits(tmp_path, task_name, capsys):
    task, source, batch = _source(task_name)
    reference = {**to_reference(source.state_dict()), **reference_buffers(source.cfg)}
    head = f"{task_name}_classifier"
    assert {k for k in reference if k.startswith(head)} == {f"{head}.{i}.{p}" for i in (0, 1, 3)
                                                          for p in ("weight", "bias")}
    rows = 3 if task_name == "nlvr2" else 2
    assert reference["token_type_embeddings.weight"].shape == (rows, 64)
    ref_file, plain_dir, back = tmp_path / "finetuned.pt", tmp_path / "plain", tmp_path / "back.pt"
    save_reference_pt(reference, str(ref_file))

    # the preset says nothing of the heads or rows: both come from the file
    assert convert_checkpoint.main(["import-reference", str(ref_file), str(plain_dir), "--preset", "tiny"]) == 0
    (new,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("new (not in the file)")]
    assert all(name.startswith("mim_head.") for name in new.split(": ")[2].split(", "))  # as a pretrained file
    assert convert_checkpoint.main(["export-reference", str(plain_dir), str(back)]) == 0
    exported = load_torch_file(str(back))
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name

    plain = PlainCheckpoint(str(plain_dir))
    cfg = plain.config()
    assert cfg.num_modality_types == rows
    heads = finetuned_heads({name: plain.shape(name) for name in plain.names()}, cfg)
    assert list(heads) == [head]
    target = build_model(cfg, heads=heads, seed=5).eval()
    report = load_into(target, plain.state_dict(), str(plain_dir))
    assert report.unexpected == [] and all(name.startswith("mim_head.") for name in report.missing)
    expected = _logits(task, source, batch)
    assert expected.shape == (3, ANSWERS if task_name == "vqa" else 2)
    assert torch.equal(_logits(task, target, batch), expected)


def test_a_finetuned_export_goes_through_from_plain_with_its_heads(tmp_path):
    """from-plain reads the heads from the plain folder (the preset's layout has none) and splits
    them with the rest; loading the TP=2 files back in one process restores every tensor."""
    from vlmo_large.checkpoint import load_sharded_plain, write_sharded
    from vlmo_large.checkpoint.plain import write_export

    task, source, batch = _source("vqa")
    write_export(str(tmp_path / "export"), source.state_dict(), source.cfg)
    write_sharded(str(tmp_path / "export"), str(tmp_path / "tp2"), tp=2)
    target = build_model(source.cfg, heads=task.heads(source.cfg, TaskOptions(num_answers=ANSWERS)), seed=9).eval()
    report = load_sharded_plain(target, str(tmp_path / "tp2"))
    assert "vqa_classifier.3.weight" in report.loaded
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert torch.equal(_logits(task, target, batch), _logits(task, source, batch))
