"""tools/evaluate.py in-process: a VQA export evaluated with no flag besides --task and --data; its
submission and official accuracy against the model's own argmax over the split's source JSON and
the VQA metric applied by hand; zero-shot retrieval of a pretrained export; one-line errors."""
import json

import pytest
import torch

from tests.conftest import randomize_
from tools.evaluate import main as evaluate_main
from vlmo_large.checkpoint.plain import ExportExtras, write_export
from vlmo_large.config import get_preset
from vlmo_large.data import load_tokenizer
from vlmo_large.evaluation.vqa_metric import vqa_accuracy
from vlmo_large.model import build_model
from vlmo_large.tasks.options import TaskOptions
from vlmo_large.tasks.registry import get_task


@pytest.fixture(scope="module")
def vqa_export(dataset, tmp_path_factory):
    cfg = get_preset("tiny", vocab_size=1000)
    options = TaskOptions(answers=dataset["vqa"]["answers"])
    torch.manual_seed(0)
    model = randomize_(build_model(cfg, heads=get_task("vqa").heads(cfg, options)), std=0.5).eval()
    out = tmp_path_factory.mktemp("vqa_export")
    write_export(str(out), model.state_dict(), cfg,
                 ExportExtras(tokenizer=dataset["tokenizer"], task="vqa", task_options={"answers": options.answers}))
    return out, model


def manifest_path(dataset) -> str:
    return dataset["retrieval"]["json"].rsplit("/retrieval/", 1)[0] + "/manifest.json"


def test_vqa_export_evaluates_with_no_extra_flags(dataset, vqa_export, tmp_path, capsys):
    folder, model = vqa_export
    out, submission = tmp_path / "metrics.json", tmp_path / "submission.json"
    assert evaluate_main([str(folder), "--task", "vqa", "--data", manifest_path(dataset), "--batch", "3",
                          "--out", str(out), "--submission", str(submission)]) == 0
    metrics = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "vqa_acc" in printed and f"{100 * metrics['vqa_acc']:.2f}%" in printed
    # by hand: each question of the split's source list through the model, the official metric on its answers
    questions = json.loads(open(dataset["vqa"]["val"]).read())
    answers = json.loads(open(dataset["vqa"]["answers"]).read())
    tokenizer, cfg = load_tokenizer(dataset["tokenizer"]), model.cfg
    from vlmo_large.data.loader import build_loader
    from vlmo_large.data.device_batch import to_device
    by_qid = {}
    for batch in build_loader("vqa", dataset["vqa"]["val_shards"], 5, tokenizer=tokenizer, image_size=cfg.image_size,
                              max_text_len=cfg.max_text_len, train=False, drop_last=False, answers=answers):
        batch = to_device(batch, "cpu", torch.float32)
        with torch.no_grad():
            hidden = model.backbone.encode_pair(batch["text_ids"], batch["text_mask"], batch["image"])
            logits = model.vqa_classifier(model.pooler(hidden))
        by_qid.update(zip(batch["qid"].tolist(), (answers[i] for i in logits.argmax(-1).tolist())))
    assert metrics["num_questions"] == len(questions) == len(by_qid)
    written = json.loads(submission.read_text())
    assert {e["question_id"]: e["answer"] for e in written} == by_qid
    humans = {q["qid"]: q["answers"] for q in questions}
    expected = sum(vqa_accuracy(by_qid[q], humans[q]) for q in by_qid) / len(by_qid)
    assert metrics["vqa_acc"] == pytest.approx(expected, abs=1e-9)


def test_zero_shot_retrieval_and_one_line_errors(dataset, vqa_export, tmp_path, capsys):
    folder, _ = vqa_export
    out = tmp_path / "r.json"
    assert evaluate_main([str(folder), "--task", "retrieval", "--data", dataset["retrieval"]["shards"],
                          "--json", dataset["retrieval"]["json"], "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 6 and metrics["chance_r1"] == pytest.approx(1 / 6)
    assert all(0.0 <= metrics[f"{d}_r{k}"] <= 1.0 for d in ("tr", "ir") for k in (1, 5, 10))
    capsys.readouterr()
    for args, message in (
        ([str(folder), "--task", "nlvr2", "--data", manifest_path(dataset)],
         f"error: {folder} has no nlvr2_classifier: it is not fine-tuned for 'nlvr2'"),
        ([str(folder), "--task", "retrieval", "--data", dataset["retrieval"]["shards"]],
         "error: --task retrieval needs --json"),
        ([str(tmp_path / "nothing"), "--task", "vqa", "--data", "x.tar"],
         f"error: checkpoint not found: {tmp_path / 'nothing'}"),
    ):
        assert evaluate_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


def test_two_ranks_equal_one_process(dataset, vqa_export, tmp_path):
    """torchrun, 2 ranks (gloo): retrieval features encoded half by each rank and gathered, VQA
    questions split over the ranks; the metrics and the submission equal one process's."""
    from tests.training.conftest import REPO, run_torchrun

    folder, _ = vqa_export
    tool = f"{REPO}/tools/evaluate.py"
    split = ["--data", dataset["retrieval"]["shards"], "--json", dataset["retrieval"]["json"], "--batch", "2"]
    vqa = ["--data", dataset["vqa"]["val_shards"], "--batch", "1"]
    for task, args in (("retrieval", split), ("vqa", vqa)):
        extra = ["--submission", str(tmp_path / "two.sub")] if task == "vqa" else []
        run_torchrun([tool, str(folder), "--task", task, *args, "--out", str(tmp_path / f"two_{task}.json"), *extra])
        extra = ["--submission", str(tmp_path / "one.sub")] if task == "vqa" else []
        assert evaluate_main([str(folder), "--task", task, *args, "--out", str(tmp_path / f"one_{task}.json"),
                              *extra]) == 0
        two, one = (json.loads((tmp_path / f"{n}_{task}.json").read_text()) for n in ("two", "one"))
        assert two.keys() == one.keys() and all(two[k] == pytest.approx(one[k], abs=1e-9) for k in one), (two, one)
    assert json.loads((tmp_path / "two.sub").read_text()) == json.loads((tmp_path / "one.sub").read_text())
