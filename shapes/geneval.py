"""The shapes world's detector for GenEval's rules (``metrics/geneval.py``).

GenEval's Mask2Former detector and CLIP colour classifier are replaced by the exact detector of ``detector.py``
(class = shape, colour = palette colour of the segment); everything after detection is the one rule engine.
GenEval's confidence thresholds (0.3, and 0.9 for counting) are calibrated for Mask2Former scores and have no meaning
for template IoU; here a blob is an object iff the detector accepts it (``DetectorConfig.min_iou``), for every tag.
"""
from __future__ import annotations

from typing import Any, Mapping

from metrics import geneval as rules
from .detector import DEFAULT_DETECTOR, Detection, DetectorConfig, detect

__all__ = ["ShapesDetector", "score_image", "summarize"]

summarize = rules.summarize


class ShapesDetector:
    """:class:`metrics.geneval.Detector` over the exact shapes detector."""

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
