"""The shapes world's evaluation suite: its held-out test scenes and the short-answer prompt suffix, shared by the
demo's training data, the scoring (``eval/shapes/evaluate.py``) and the benchmark-file export
(``eval/shapes/export.py``)."""
from __future__ import annotations

from . import world as W

__all__ = ["VQA_SUFFIX", "test_scenes"]

VQA_SUFFIX = " Answer the question using a single word or phrase."  # LLaVA's short-answer suffix


def test_scenes(n: int, seed: int = 0) -> list[W.Scene]:
    """The held-out scenes scored by ``unitok demo`` and ``unitok eval shapes`` (the same ones for the same seed).
    ``seed + 1``: a different stream from the demo's training draw with ``seed`` (the split hash alone already keeps
    test layouts out of training)."""
    return W.generate_split("test", n, seed=seed + 1)
