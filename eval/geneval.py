"""GenEval's rules, for any detector: ``unitok eval geneval-score DIR``.

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
(``eval/shapes/geneval.py``), whose scores are template IoUs, not probabilities, so the thresholds do not apply to it.

    unitok eval geneval-score runs/geneval --detector mask2former --detector-path DIR --clip-path DIR
    unitok eval geneval-score runs/shapes-geneval --detector shapes
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

__all__ = ["COLORS", "THRESHOLD", "COUNTING_THRESHOLD", "MAX_OBJECTS", "POSITION_THRESHOLD", "Detector",
           "relative_position", "keep_objects", "evaluate", "score_image", "prompt_folders", "score_folder",
           "write_results", "summarize", "format_summary"]

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
def prompt_folders(root: str | os.PathLike) -> Iterator[tuple[Path, dict, list[Path]]]:
    """GenEval's layout: ``<root>/<digits>/metadata.jsonl`` (one JSON object) and ``<root>/<digits>/samples/
    <digits>.png``; other folders and files are skipped, as GenEval does. Sorted order (GenEval uses ``os.listdir``
    order, which does not change the summary). Yields (folder, metadata, sample paths)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no GenEval folder at {root}")
    for sub in sorted(os.listdir(root)):
        folder = root / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        meta_path = folder / "metadata.jsonl"
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{meta_path}: missing (every prompt folder has its metadata)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not one JSON object ({err.msg})") from None
        missing = [k for k in ("tag", "prompt", "include") if k not in metadata]
        if missing:
            raise ValueError(f"{meta_path}: no {', '.join(missing)} (GenEval metadata has tag, prompt, include)")
        samples = folder / "samples"
        names = sorted(os.listdir(samples)) if samples.is_dir() else []
        yield folder, metadata, [samples / n for n in names if re.fullmatch(r"\d+\.png", n) and (samples / n).is_file()]


def score_folder(root: str | os.PathLike, detector: Detector, progress: bool = False) -> tuple[list[dict], list[str]]:
    """Score every sample of a GenEval folder. Returns (result records with ``filename`` first, unreadable images:
    each named and left out of the results instead of ending the run)."""
    from tqdm import tqdm

    from tokenizer.image import load_image

    jobs = [(path, metadata) for _, metadata, paths in prompt_folders(root) for path in paths]
    results, unreadable = [], []
    for path, metadata in tqdm(jobs, desc=f"GenEval ({detector.name})", unit="img", disable=not progress):
        try:
            image = load_image(path)
        except (ValueError, FileNotFoundError) as err:
            unreadable.append(str(err))
            continue
        results.append({"filename": str(path), **score_image(image, metadata, detector)})
    return results, unreadable


def write_results(results: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """``results.jsonl`` as GenEval writes it (one record per line), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(dict(r)) + "\n")
    tmp.replace(path)


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
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="GenEval layout: <folder>/<00000>/metadata.jsonl + samples/<0000>.png")
    p.add_argument("--detector", choices=["mask2former", "shapes"], default="mask2former",
                   help="mask2former: transformers Mask2Former + CLIP colours, GenEval's models ported (not "
                        "OpenMMLab's weights); shapes: the shapes world's exact detector")
    p.add_argument("--detector-path", default=None,
                   help="local folder of a Mask2FormerForUniversalSegmentation checkpoint with its image processor "
                        "(facebook/mask2former-swin-small-coco-instance)")
    p.add_argument("--clip-path", default=None,
                   help="local folder of a CLIPModel with its tokenizer and image processor "
                        "(openai/clip-vit-large-patch14)")
    p.add_argument("--class-names", default=None,
                   help="the detector's class names, one per line in label order (GenEval's object_names.txt); "
                        "default: the detector's id2label")
    p.add_argument("--out", default=None, help="results.jsonl path (default: <folder>/results.jsonl)")
    p.add_argument("--device", default=None)


def build_detector(args: argparse.Namespace) -> Detector:
    if args.detector == "shapes":
        from .shapes.geneval import ShapesDetector

        return ShapesDetector()
    from .geneval_hf import Mask2FormerDetector

    missing = [flag for flag, v in (("--detector-path", args.detector_path), ("--clip-path", args.clip_path)) if not v]
    if missing:
        raise ValueError(f"--detector mask2former needs {' and '.join(missing)} (local model folders; see README)")
    return Mask2FormerDetector(args.detector_path, args.clip_path, class_names=args.class_names, device=args.device)


def run(args: argparse.Namespace) -> int:
    detector = build_detector(args)
    results, unreadable = score_folder(args.folder, detector, progress=True)
    out = Path(args.out) if args.out else Path(args.folder) / "results.jsonl"
    write_results(results, out)
    summary = {**summarize(results), "detector": detector.name, "unreadable": unreadable}
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for line in unreadable:
        print(f"skipped: {line}", file=sys.stderr)
    print(format_summary(summary, f"GenEval ({detector.name})"))
    print(f"wrote {out} and {out.with_name(out.stem + '_summary.json')}")
    return 0
