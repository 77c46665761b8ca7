"""VQA scoring for the shapes world: one ground-truth answer per question (see ``vqa_metric.single_answer_accuracy``
for the normalisation rule), reported overall and per question type."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..vqa_metric import single_answer_accuracy

__all__ = ["score_vqa"]


def score_vqa(predictions: Iterable[str], questions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``predictions[i]`` (raw model text) against ``questions[i]["answer"]``.
    Returns ``{"accuracy", "per_type": {type: accuracy}, "n", "scores": [0/1 per question]}``."""
    preds, qs = list(predictions), list(questions)
    if len(preds) != len(qs):
        raise ValueError(f"{len(preds)} predictions for {len(qs)} questions")
    scores = [single_answer_accuracy(p, q["answer"]) for p, q in zip(preds, qs)]
    per_type: dict[str, list[float]] = {}
    for s, q in zip(scores, qs):
        per_type.setdefault(q.get("type", ""), []).append(s)
    return {"accuracy": sum(scores) / len(scores) if scores else float("nan"),
            "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
            "n": len(scores), "scores": scores}
