"""Tiny fake VQA v2, NLVR2 and Karpathy inputs in their official layouts, with a few deliberate faults,
for the fine-tuning packing and loader tests. Each maker returns what a correct packing must hold."""
import json
import os

from PIL import Image

HUMANS = ["yes"] * 6 + ["no"] * 3 + ["maybe"]  # soft scores: yes 1.0, no 0.9, maybe 0.3


def _image(path, colour, fmt=None, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return str(path)


def fake_vqa(root):
    """VQA v2 train files + COCO images under root/coco/train2014. Returns (questions, annotations,
    image root, {qid: (question, answers, image path)} of the good questions, [expected skip reasons])."""
    images = {i: _image(root / "coco" / "train2014" / f"COCO_train2014_{i:012d}.jpg", (40 * i, 100, 20), "JPEG")
              for i in (1, 2)}
    questions = [
        {"image_id": 1, "question": "Is it  red?", "question_id": 10},
        {"image_id": 1, "question": "How many?", "question_id": 11},
        {"image_id": 2, "question": "What colour?", "question_id": 20},
        {"image_id": 3, "question": "No image file?", "question_id": 30},     # missing_image_file
        {"image_id": 2, "question": "Not annotated?", "question_id": 21},     # no_annotation
        {"image_id": 2, "question": "No answers?", "question_id": 22},        # no_answers
        {"image_id": 2, "question": 5, "question_id": 23},                    # bad_question
    ]
    answers = {10: HUMANS, 11: ["2"] * 9 + ["3"], 20: ["blue"] * 2 + ["green"] * 8, 30: ["yes"] * 10,
               22: []}
    majority = {10: "yes", 11: "2", 20: "green", 30: "yes", 22: "yes"}
    annotations = [{"question_id": q, "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(ans)],
                    "multiple_choice_answer": majority[q]} for q, ans in answers.items()]
    qpath, apath = root / "v2_OpenEnded_mscoco_train2014_questions.json", root / "v2_mscoco_train2014_annotations.json"
    qpath.write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    good = {q["question_id"]: (" ".join(q["question"].split()), answers[q["question_id"]], images[q["image_id"]])
            for q in questions[:3]}
    return str(qpath), str(apath), str(root / "coco"), good, ["missing_image_file", "no_annotation", "no_answers",
                                                              "bad_question"]


def fake_nlvr2(root):
    """NLVR2 train JSON lines + images/train/<directory>/. Returns (jsonl, image root, {identifier:
    (sentence, label, left path, right path)} of the good lines, {line number: expected skip reason})."""
    folder = root / "images" / "train"
    for n, (stem, directory) in enumerate((("train-1-0", 7), ("train-2-1", 8), ("train-3-0", 7))):
        for side in (0, 1):
            _image(folder / str(directory) / f"{stem}-img{side}.png", (60 * n, 80 * side, 90))
    records = [
        {"identifier": "train-1-0-0", "sentence": "Both  images show dogs.", "label": "True", "directory": 7},
        {"identifier": "train-2-1-3", "sentence": "The left image has more.", "label": "False", "directory": 8},
        "not json",                                                                                       # bad_json
        {"identifier": "train-3-0-1", "sentence": "Perhaps.", "label": "maybe", "directory": 7},         # bad_label
        {"identifier": "train-9-0-0", "sentence": "No images.", "label": "True", "directory": 7},     # missing image
        {"identifier": "train-3-0-2", "label": "True", "directory": 7},                           # missing_sentence
    ]
    path = root / "train.json"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    good = {"train-1-0-0": ("Both images show dogs.", True, str(folder / "7" / "train-1-0-img0.png"),
                            str(folder / "7" / "train-1-0-img1.png")),
            "train-2-1-3": ("The left image has more.", False, str(folder / "8" / "train-2-1-img0.png"),
                            str(folder / "8" / "train-2-1-img1.png"))}
    return str(path), str(folder), good, {3: "bad_json", 4: "bad_label", 5: "missing_image_file",
                                          6: "missing_sentence"}


def fake_karpathy(root):
    """dataset_coco.json + images under root/coco/<filepath>/. Returns (json, image root, {split:
    [(image path, captions)]} of the good entries, [expected skip reasons])."""
    def entry(n, split, captions, filepath="val2014"):
        name = f"COCO_{filepath}_{n:012d}.jpg"
        return {"filepath": filepath, "filename": name, "split": split, "cocoid": n,
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]}

    entries = [entry(1, "train", ["A dog.", "A  brown dog."], "train2014"), entry(2, "restval", ["A cat."]),
               entry(3, "test", ["Two birds.", "Birds on a wire.", "Sky."]), entry(4, "test", ["A car."]),
               entry(5, "val", ["A boat."]),
               entry(6, "test", ["Image file missing."]),                    # missing_image_file
               entry(7, "extra", ["Unknown split."]),                        # unknown_split
               entry(8, "train", [""], "train2014")]                         # empty_caption + no_caption
    for e in entries[:5] + entries[6:]:
        _image(root / "coco" / e["filepath"] / e["filename"], (30 * e["cocoid"], 50, 50), "JPEG")
    entries[3]["sentences"].append({"raw": 5})                               # caption_not_text; "A car." stays
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    image = lambda e: str(root / "coco" / e["filepath"] / e["filename"])  # noqa: E731
    good = {"train": [(image(entries[0]), ["A dog.", "A brown dog."]), (image(entries[1]), ["A cat."])],
            "val": [(image(entries[4]), ["A boat."])],
            "test": [(image(entries[2]), ["Two birds.", "Birds on a wire.", "Sky."]), (image(entries[3]), ["A car."])]}
    return str(path), str(root / "coco"), good, ["caption_not_text", "missing_image_file", "unknown_split",
                                                              "empty_caption", "no_caption"]
