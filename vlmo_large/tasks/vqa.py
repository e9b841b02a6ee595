"""VQA v2 fine-tuning: the fused encoder on (question, image), the pooled text CLS -> the answer
classifier, binary cross-entropy against the soft answer scores times the number of answers, as the
reference scales it (docs/MODEL.md section 8; evaluation/vqa_metric.py has the targets, the loss
and the official accuracy)."""
from __future__ import annotations

import torch

from vlmo_large.data.vqa_targets import load_answers
from vlmo_large.errors import UserError
from vlmo_large.evaluation.gather import default_group, sum_over_ranks
from vlmo_large.evaluation.vqa_metric import soft_score_loss, vqa_accuracy
from vlmo_large.model.heads import vqa_classifier
from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.passes import PassInput
from vlmo_large.tasks.registry import register


class AnswerVocabularyError(UserError):
    """The VQA answer vocabulary (task.answers / task.num_answers) is missing or unreadable."""


@register
class VQA(Task):
    name = "vqa"
    data_kind = "vqa"
    passes = (EncoderPass("pair", keep="cls"),)  # the pooler reads the first token only
    terms = ("vqa", "vqa_score")

    def heads(self, cfg, options) -> dict:
        width, answers = classifier_answers(options)
        return {"vqa_classifier": vqa_classifier(cfg.embed_dim, width, answers)}

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        return [PassInput(ids=batch["text_ids"], mask=batch["text_mask"], image=batch["image"])]

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """BCE * #answers on the classifier's logits; vqa_score: the soft target of the predicted answer."""
        (fused,) = outputs
        logits = vqa_logits(model, fused.x)
        targets = batch["vqa_targets"]
        loss = soft_score_loss(logits, targets)
        score = targets.gather(1, logits.detach().argmax(-1, keepdim=True)).mean()
        return {"loss": loss, "vqa": loss, "vqa_score": score}

    def predict(self, model, batch: dict) -> torch.Tensor:
        """[B] the predicted answer indices."""
        (fused,) = self.encode(model, [0], self.inputs(batch, StepContext())).values()
        return vqa_logits(model, fused.x).argmax(-1)

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        D, B = cfg.embed_dim, batch["text_ids"].shape[0]
        answers = batch["vqa_targets"].shape[1]
        return float(B * 2 * (D * D + D * 2 * D + 2 * D * answers))  # pooler, then the classifier's two Linears

    def heldout_batch(self, model, outputs: list, batch: dict) -> dict:
        """[soft score, official accuracy, questions, official] summed over the batch; official: 1 when
        the classifier knows its answer strings (task.answers) and the batch has the human answers."""
        (fused,) = outputs
        predicted = vqa_logits(model, fused.x).argmax(-1)
        labels = model.vqa_classifier.labels
        official = labels is not None and "vqa_answers" in batch
        accuracy = 0.0
        if official:
            accuracy = sum(vqa_accuracy(labels[a], humans) for a, humans in zip(predicted.tolist(), batch["vqa_answers"]))
        score = float(batch["vqa_targets"].gather(1, predicted[:, None]).sum())
        return {"sums": torch.tensor([score, accuracy, predicted.shape[0], float(official)], dtype=torch.float64,
                                     device=fused.x.device)}

    def heldout_reduce(self, parts: list) -> dict:
        """vqa_score: the reference's score (the soft target of the predicted answer, i.e. its VQA
        accuracy when the answer is in the vocabulary); vqa_acc: the official accuracy against the
        batches' human answers, when every batch of this rank has them and the vocabulary's strings
        are known. Over every rank's batches (collective over the data-parallel group)."""
        official = all(bool(part["sums"][3]) for part in parts)
        sums = sum(part["sums"][:3] for part in parts) if parts else torch.zeros(3, dtype=torch.float64)
        score, accuracy, questions = sum_over_ranks(sums, default_group()).tolist()
        metrics = {"vqa_score": score / max(questions, 1), "num_questions": questions}
        if official:
            metrics["vqa_acc"] = accuracy / max(questions, 1)
        return metrics


def classifier_answers(options) -> tuple[int, tuple | None]:
    """(the classifier's width, its answer strings or None) from the run's TaskOptions."""
    answers = tuple(load_answers(options.answers)) if options.answers else None
    width = options.num_answers if options.num_answers is not None else len(answers or ())
    if answers is not None and options.num_answers is not None and width != len(answers):
        raise AnswerVocabularyError(f"task.num_answers={width} but task.answers {options.answers} lists "
                                    f"{len(answers)} answers; drop task.num_answers or make them agree")
    if width < 1:
        raise AnswerVocabularyError("task 'vqa' needs its answer vocabulary: set task.answers to the JSON "
                                    "list of answers (or task.num_answers to the classifier's width)")
    return width, answers


def vqa_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[B, answers] float32 logits from the fused pass's final states (the first: the text CLS)."""
    return model.vqa_classifier(model.pooler(hidden)).float()


@torch.no_grad()
def vqa_predictions(model, batches) -> dict[int, str]:
    """{question id: predicted answer} over this rank's batches (a test-dev submission's entries);
    the classifier must know its answers (task.answers)."""
    model = getattr(model, "module", model)
    labels = model.vqa_classifier.labels
    if labels is None:
        raise AnswerVocabularyError("the VQA classifier has no answer strings: set task.answers")
    out, task = {}, VQA()
    for batch in batches:
        predicted = task.predict(model, batch).tolist()
        out.update({int(q): labels[a] for q, a in zip(batch["qid"].tolist(), predicted)})
    return out
