"""Read VQA questions into packing items of kind "vqa" (shard_packing); bad entries are skipped and reported.

Two inputs:
- VQA v2's official files: the questions JSON ({"data_subtype": "train2014", "questions": [{"image_id",
  "question", "question_id"}, ...]}), its annotations JSON ({"annotations": [{"question_id", "answers":
  [{"answer"}, ... 10], "multiple_choice_answer"}, ...]}; a test split has none) and the COCO image folder
  (COCO_<subtype>_<image_id:012d>.jpg directly in it or in its <subtype>/ folder; test-dev's images are
  test2015's).
- the synthetic dataset's vqa/<split>.json (data/synthetic.py): a list of {"qid", "image", "question",
  "answer", "answers"}, image paths relative to the JSON file.

Items: {"image": path, "json": {"question", "answers", "qid"}, "majority": the annotators' majority answer
(None without annotations): what the answer vocabulary is built from}. A question that is not an
object, has no text or id, has no annotation or no answer (when annotations are given), or whose image
file is missing is skipped, counted by reason and listed as "<file>: questions[<n>]: reason (detail)".
A file that is not the JSON it should be stops the tool (UserError): nothing of it could be packed.
"""
from __future__ import annotations

import os
import re

from vlmo_large.data.pair_tables import SkipLog, is_json_list, read_json
from vlmo_large.errors import UserError

_SUBTYPE_IN_NAME = re.compile(r"(train|val|test-dev|test)(20\d\d)")


def _answers(value) -> list[str]:
    """Human answers as strings: VQA v2's [{"answer": ...}] objects or plain strings (synthetic)."""
    if not isinstance(value, list):
        return []
    found = [a.get("answer") if isinstance(a, dict) else a for a in value]
    return [a for a in found if isinstance(a, str) and a.strip()]


def _coco_image(root: str, subtype: str, image_id: int) -> str:
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    inside = os.path.join(root, subtype, name)
    return inside if os.path.exists(inside) else os.path.join(root, name)


def _subtype(questions: dict, path: str) -> str:
    subtype = questions.get("data_subtype")
    if not isinstance(subtype, str):
        match = _SUBTYPE_IN_NAME.search(os.path.basename(path))
        if not match:
            raise UserError(f"{path}: no 'data_subtype' (e.g. \"train2014\") and none in the file name: "
                            "the COCO image names cannot be made")
        subtype = match.group(0)
    return subtype.replace("test-dev", "test")  # test-dev questions are about test2015 images


def _read_vqa_v2(questions_path: str, annotations_path: str | None, image_root: str, log: SkipLog) -> list[dict]:
    """Items of the official files (module doc); `log` collects what was skipped."""
    questions = read_json(questions_path, "VQA questions file")
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise UserError(f"{questions_path}: not a VQA questions file (no 'questions' list)")
    subtype = _subtype(questions, questions_path)
    annotations = None
    if annotations_path:
        data = read_json(annotations_path, "VQA annotations file")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise UserError(f"{annotations_path}: not a VQA annotations file (no 'annotations' list)")
        annotations = {a.get("question_id"): a for a in data["annotations"] if isinstance(a, dict)}
    items, seen_images = [], {}
    for n, q in enumerate(questions["questions"]):
        where = f"{questions_path}: questions[{n}]"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
            log.skip(where, "bad_question", "not an object with a question text")
            continue
        qid, image_id = q.get("question_id"), q.get("image_id")
        if not isinstance(qid, int) or not isinstance(image_id, int):
            log.skip(where, "bad_question", "question_id and image_id must be integers")
            continue
        answers, majority = [], None
        if annotations is not None:
            note = annotations.get(qid)
            if note is None:
                log.skip(where, "no_annotation", f"question_id {qid} is not in {annotations_path}")
                continue
            answers, majority = _answers(note.get("answers")), note.get("multiple_choice_answer")
            if not answers:
                log.skip(where, "no_answers", f"question_id {qid} has no human answer")
                continue
        if image_id not in seen_images:
            path = _coco_image(image_root, subtype, image_id)
            seen_images[image_id] = path if os.path.exists(path) else None
        if seen_images[image_id] is None:
            log.skip(where, "missing_image_file", f"no COCO_{subtype}_{image_id:012d}.jpg in {image_root}")
            continue
        items.append({"image": seen_images[image_id], "majority": majority,
                      "json": {"question": " ".join(q["question"].split()), "answers": answers, "qid": qid}})
    return items


def _read_vqa_list(path: str, log: SkipLog) -> list[dict]:
    """Items of the synthetic dataset's list format (module doc); `log` collects what was skipped."""
    entries = read_json(path, "VQA question list")
    if not isinstance(entries, list):
        raise UserError(f"{path}: a VQA question list must be a JSON list of {{qid, image, question, answers}}")
    root, items = os.path.dirname(os.path.abspath(path)), []
    for n, e in enumerate(entries):
        where = f"{path}: [{n}]"
        if not isinstance(e, dict) or not isinstance(e.get("question"), str) or not e["question"].strip():
            log.skip(where, "bad_question", "not an object with a question text")
            continue
        if not isinstance(e.get("qid"), int) or not isinstance(e.get("image"), str):
            log.skip(where, "bad_question", "qid must be an integer and image a path")
            continue
        answers = _answers(e.get("answers"))
        if not answers:
            log.skip(where, "no_answers", f"qid {e['qid']} has no human answer")
            continue
        image = os.path.join(root, e["image"])
        if not os.path.exists(image):
            log.skip(where, "missing_image_file", f"no {image}")
            continue
        items.append({"image": image, "majority": e.get("answer"),
                      "json": {"question": " ".join(e["question"].split()), "answers": answers, "qid": e["qid"]}})
    return items


def read_vqa(path: str, annotations: str | None, image_root: str | None, log: SkipLog) -> list[dict]:
    """Items of one questions file: the synthetic list (a JSON list) or VQA v2's official questions with
    their `annotations` (None: a test split) and COCO `image_root` (default the file's folder)."""
    if is_json_list(path):
        return _read_vqa_list(path, log)
    return _read_vqa_v2(path, annotations, image_root or os.path.dirname(os.path.abspath(path)), log)
