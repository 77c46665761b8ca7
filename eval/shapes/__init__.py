"""Scoring models on the shapes world (``shapes/``): tokenizer PSNR, VQA accuracy and GenEval-style generation
(``evaluate``: ``unitok eval shapes``), the VQA scorer (``vqa``), and its test scenes in the official benchmarks'
file layouts (``export``: ``unitok eval shapes-export``)."""
from .vqa import score_vqa

__all__ = ["score_vqa"]
