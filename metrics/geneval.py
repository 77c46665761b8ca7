"""GenEval's rules, for any detector (``unitok eval geneval-score`` applies them to a folder: ``eval/geneval.py``).

The logic after detection is djghosh13/geneval's (``evaluation/evaluate_images.py`` and ``summary_scores.py`` @
af4902f; ``notes/eval_spec.md`` §8), unchanged:

* per class, detections in descending score; a detector with calibrated scores (Mask2Former) keeps those with score
  > 0.3, or > 0.9 for every class when the prompt's tag is ``counting``; at most 16 per class; no NMS;
* ``include`` items in order: take the first ``count`` objects of the class, fail with ``expected <c>>=<n>, found <k>``
  when there are fewer; colour check: at least ``count`` of them are classified as the colour; position check (only if
  the item still matches): the target item must have matched (``no target for ...``), and *every* taken object must
  have the relation to *every* object of the target group (:func:`relative_position`, margin 0.1);
* ``exclude`` items fail the image when ``#kept(class) >= count``;
* summary: per task = mean of ``correct`` over that tag's images (first-appearance order), overall = unweighted mean
  of the per-task values; also % correct images and % correct prompts (any image of the prompt correct).

Two detectors plug in (:class:`Detector`): the transformers Mask2Former + CLIP port of GenEval's models
(``eval/geneval_hf.py``; the figure is "GenEval (transformers detector)") and the shapes world's exact detector
(``shapes/geneval.py``), whose scores are template IoUs, not probabilities, so the thresholds do not apply to it.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

__all__ = ["COLORS", "THRESHOLD", "COUNTING_THRESHOLD", "MAX_OBJECTS", "POSITION_THRESHOLD", "Detector",
           "relative_position", "revised_offset", "keep_objects", "evaluate", "score_image", "summarize",
           "format_summary"]

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1


class Detector(Protocol):
    """What the rules need from a detector. Objects have ``bbox`` ``(x1, y1, x2, y2)`` and ``score``."""

    name: str
    calibrated: bool  # scores are probabilities: GenEval's 0.3 / 0.9 thresholds apply

    def detect(self, image) -> Mapping[str, Sequence[Any]]:
        """Class name -> candidate objects (any order, any score)."""

    def colors(self, image, objects: Sequence[Any], classname: str) -> list[str]:
        """The colour (one of :data:`COLORS`) of each object."""


# ---------------------------------------------------------------------------- geometry
def _box(o) -> tuple[float, float, float, float]:
    for attr in ("bbox", "box"):
        if hasattr(o, attr):
            o = getattr(o, attr)
            break
    return tuple(float(v) for v in o[:4])  # type: ignore[return-value]


def revised_offset(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """``offset = centre_A - centre_B`` and the offset with each component shrunk by ``threshold * (dimA + dimB)``
    (floored at 0, sign kept)."""
    a = np.asarray(_box(box_a), np.float64).reshape(2, 2)
    b = np.asarray(_box(box_b), np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    return offset, np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A relative to B, exactly GenEval's ``relative_position``: boxes ``(x1, y1, x2, y2)`` (or objects
    with a ``bbox``/``box``); all revised components < 1e-3 -> no relation; otherwise divide by the *unrevised* norm
    and test +-0.5 per axis (image y grows downwards)."""
    offset, revised = revised_offset(box_a, box_b, threshold)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


# ---------------------------------------------------------------------------- one image
def keep_objects(candidates: Mapping[str, Sequence[Any]], tag: str, calibrated: bool = True,
                 max_objects: int = MAX_OBJECTS) -> dict[str, list[Any]]:
    """Per class: descending score (ties keep the detector's order), over the tag's threshold when the scores are
    calibrated, at most ``max_objects``; classes left empty are absent."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for classname, objs in candidates.items():
        objs = sorted(objs, key=lambda o: -float(o.score))
        if calibrated:
            objs = [o for o in objs if float(o.score) > threshold]
        if objs:
            kept[classname] = objs[:max_objects]
    return kept


def evaluate(objects: Mapping[str, Sequence[Any]], metadata: Mapping[str, Any],
             colors_of: Callable[[Sequence[Any], str], list[str]],
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """GenEval's ``evaluate()`` on the kept objects. ``colors_of(objects, classname)`` classifies the taken objects
    of a colour item (only those, as GenEval does). Returns (correct, reason)."""
    correct = True
    reason = []
    matched_groups: list[Sequence[Any] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found_objects = list(objects.get(classname, []))[:req["count"]]
        if len(found_objects) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found_objects)}")
        else:
            if "color" in req:
                colors = colors_of(found_objects, classname)
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found_objects:
                        for target_obj in matched_groups[target_group]:
                            true_rels = relative_position(obj, target_obj, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              + f"{' and '.join(true_rels)} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found_objects if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def score_image(image, metadata: Mapping[str, Any], detector: Detector) -> dict[str, Any]:
    """One result record in GenEval's format, less ``filename``: ``{tag, prompt, correct, reason, metadata (JSON
    string), details (JSON string: class -> [[x1, y1, x2, y2, score], ...] of the kept objects)}``."""
    objects = keep_objects(detector.detect(image), metadata["tag"], detector.calibrated)
    correct, reason = evaluate(objects, metadata, lambda objs, cls: detector.colors(image, objs, cls))
    return {
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({k: [list(_box(o)) + [float(o.score)] for o in v] for k, v in objects.items()}),
    }


# ---------------------------------------------------------------------------- folders
def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary_scores.py``: ``per_task`` (tag -> mean correct, first-appearance order), ``overall`` (mean of the
    per-task values), ``correct_images``, ``correct_prompts``, ``n_images``, ``n_prompts``, and per-task counts."""
    rows = list(results)
    if not rows:
        return {"per_task": {}, "overall": float("nan"), "correct_images": float("nan"),
                "correct_prompts": float("nan"), "n_images": 0, "n_prompts": 0, "counts": {}}
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for r in rows:
        c = bool(r["correct"])
        by_tag.setdefault(r["tag"], []).append(c)
        key = r["metadata"] if isinstance(r.get("metadata"), str) else json.dumps(r.get("metadata", r["prompt"]))
        by_prompt[key] = by_prompt.get(key, False) or c
    per_task = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return {
        "per_task": per_task,
        "overall": float(np.mean(list(per_task.values()))),
        "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
        "correct_prompts": float(np.mean(list(by_prompt.values()))),
        "n_images": len(rows),
        "n_prompts": len(by_prompt),
        "counts": {t: (int(sum(v)), len(v)) for t, v in by_tag.items()},
    }


def format_summary(summary: Mapping[str, Any], label: str = "GenEval") -> str:
    """``summary_scores.py``'s figures: per task and overall with 5 decimals, % correct images and prompts."""
    lines = [f"{t:<16} {v:.5f}  ({summary['counts'][t][0]} / {summary['counts'][t][1]})"
             for t, v in summary["per_task"].items()]
    lines.append(f"{label} overall {summary['overall']:.5f}   correct images {100 * summary['correct_images']:.2f} %, "
                 f"correct prompts {100 * summary['correct_prompts']:.2f} %  ({summary['n_images']} images, "
                 f"{summary['n_prompts']} prompts)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI: unitok eval geneval-score
