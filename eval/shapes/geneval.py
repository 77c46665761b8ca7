"""GenEval's rules applied to the shapes world (djghosh13/geneval ``evaluation/evaluate_images.py`` ``evaluate()`` and
``summary_scores.py``, @ af4902f; rules in ``notes/eval_spec.md`` §8).

The Mask2Former detector and the CLIP colour classifier are replaced by the exact detector of ``detector.py``
(class = shape, colour = palette colour of the segment). Everything after detection is GenEval's logic, unchanged:

* per class, detections in descending confidence (here: template IoU), at most 16 (``max_objects``); no NMS;
* ``include`` items in order: take the first ``count`` objects of the class, fail with ``expected <c>>=<n>, found <k>``
  when there are fewer; colour check: at least ``count`` of them have the colour; position check (only if the item
  still matches): the target item must have matched (``no target for ...``), and *every* taken object must have the
  relation to *every* object of the target group (``relative_position`` with margin 0.1);
* ``exclude`` items fail the image when ``#detections(class) >= count``;
* summary: per task = mean of ``correct`` over that tag's images (first-appearance order), overall = unweighted mean
  of the per-task values; also % correct images and % correct prompts (any image of the prompt correct).

GenEval's confidence thresholds (0.3, and 0.9 for counting) are calibrated for Mask2Former scores and have no
meaning for template IoU; here a blob is an object iff the detector accepts it (``DetectorConfig.min_iou``), for
every tag.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .detector import DEFAULT_DETECTOR, Detection, DetectorConfig, detect, detections_by_class
from .world import relative_position

__all__ = ["GENEVAL_COLORS", "evaluate", "score_image", "score_detections", "summarize", "score_folder",
           "write_prompt_folders"]

# GenEval's colour list (evaluate_images.py COLORS); used for the reason strings' order.
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
POSITION_THRESHOLD = 0.1
MAX_OBJECTS = 16


def evaluate(objects: Mapping[str, list[Detection]], metadata: Mapping[str, Any],
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """GenEval's ``evaluate()`` on per-class detection lists (most confident first). Returns (correct, reason)."""
    correct = True
    reason = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found_objects = list(objects.get(classname, []))[:req["count"]]
        if len(found_objects) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found_objects)}")
        else:
            if "color" in req:
                colors = [obj.color for obj in found_objects]
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found_objects:
                        for target_obj in matched_groups[target_group]:
                            true_rels = relative_position(obj.bbox, target_obj.bbox, position_threshold)
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


def score_detections(detections: list[Detection], metadata: Mapping[str, Any],
                     max_objects: int = MAX_OBJECTS) -> dict[str, Any]:
    """One result record in GenEval's output format (``filename`` left to the caller)."""
    objects = detections_by_class(detections, max_objects)
    correct, reason = evaluate(objects, metadata)
    return {
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps({k: [list(d.bbox) + [d.score] for d in v] for k, v in objects.items()}),
    }


def score_image(image: Any, metadata: Mapping[str, Any], config: DetectorConfig = DEFAULT_DETECTOR) -> dict[str, Any]:
    """Score one generated image (PIL image, array or path) against GenEval metadata.
    Returns ``{"tag", "prompt", "correct", "reason", "metadata", "details"}``."""
    return score_detections(detect(image, config), metadata)


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


def score_folder(root: str | os.PathLike, config: DetectorConfig = DEFAULT_DETECTOR) -> list[dict[str, Any]]:
    """Score a GenEval-layout folder: ``<root>/<digits>/metadata.jsonl`` (one JSON object) and
    ``<root>/<digits>/samples/<digits>.png``; other folders/files are skipped, as GenEval does. Folders and samples
    are visited in sorted order (GenEval uses ``os.listdir`` order, which does not change the summary)."""
    root = Path(root)
    out = []
    for sub in sorted(os.listdir(root)):
        folder = root / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        with open(folder / "metadata.jsonl") as fp:
            metadata = json.load(fp)
        for name in sorted(os.listdir(folder / "samples")):
            path = folder / "samples" / name
            if not path.is_file() or not re.match(r"\d+\.png", name):
                continue
            rec = score_image(path, metadata, config)
            out.append({"filename": str(path), **rec})
    return out


def write_prompt_folders(root: str | os.PathLike, prompts: Iterable[Mapping[str, Any]]) -> list[Path]:
    """Create GenEval's generation layout: ``<root>/<index:05d>/metadata.jsonl`` + an empty ``samples/``."""
    root = Path(root)
    paths = []
    for i, m in enumerate(prompts):
        folder = root / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as fp:
            json.dump(dict(m), fp)
        paths.append(folder)
    return paths
