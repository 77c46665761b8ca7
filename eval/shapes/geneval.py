"""The shapes world's detector for GenEval's rules (``eval/geneval.py``).

GenEval's Mask2Former detector and CLIP colour classifier are replaced by the exact detector of ``detector.py``
(class = shape, colour = palette colour of the segment); everything after detection is the one rule engine.
GenEval's confidence thresholds (0.3, and 0.9 for counting) are calibrated for Mask2Former scores and have no meaning
for template IoU; here a blob is an object iff the detector accepts it (``DetectorConfig.min_iou``), for every tag.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .. import geneval as rules
from .detector import DEFAULT_DETECTOR, Detection, DetectorConfig, detect

__all__ = ["ShapesDetector", "score_image", "summarize", "score_folder", "write_prompt_folders"]

summarize = rules.summarize


class ShapesDetector:
    """:class:`eval.geneval.Detector` over the exact shapes detector."""

    name = "shapes detector"
    calibrated = False

    def __init__(self, config: DetectorConfig = DEFAULT_DETECTOR):
        self.config = config

    def detect(self, image) -> dict[str, list[Detection]]:
        out: dict[str, list[Detection]] = {}
        for d in detect(image, self.config):
            out.setdefault(d.shape, []).append(d)
        return out

    def colors(self, image, objects, classname: str) -> list[str]:
        return [o.color for o in objects]


def score_image(image: Any, metadata: Mapping[str, Any], config: DetectorConfig = DEFAULT_DETECTOR) -> dict[str, Any]:
    """Score one generated image (PIL image, array or path) against GenEval metadata.
    Returns ``{"tag", "prompt", "correct", "reason", "metadata", "details"}``."""
    return rules.score_image(image, metadata, ShapesDetector(config))


def score_folder(root: str | os.PathLike, config: DetectorConfig = DEFAULT_DETECTOR) -> list[dict[str, Any]]:
    """Score a GenEval-layout folder with the shapes detector (unreadable images are an error here)."""
    results, unreadable = rules.score_folder(root, ShapesDetector(config))
    if unreadable:
        raise ValueError(unreadable[0])
    return results


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
