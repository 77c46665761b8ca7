"""``unitok eval <benchmark> ...``: scoring entry points (``shapes``: the toy world's PSNR / VQA / GenEval table)."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {"shapes": ("eval.shapes.evaluate", "tokenizer PSNR, VQA accuracy and GenEval-style scores in the "
                                                 "shapes world"),
              "vqa": ("eval.vqa_runner", "answer a benchmark (vqav2, gqa, textvqa, pope, mme) with a checkpoint, "
                                         "LLaVA-1.5 protocol, then score it or write its submission file"),
              "shapes-export": ("eval.shapes.export", "the shapes world's test scenes in POPE, GQA, VQAv2 and MME "
                                                      "file layouts (for `eval vqa` end to end)"),
              "geneval": ("eval.geneval_generate", "GenEval's prompts -> images in GenEval's folder layout (CFG, "
                                                   "temperature, top-k/p and seeds recorded; resumable)"),
              "geneval-score": ("eval.geneval", "GenEval's rules on a folder of samples, with the transformers "
                                                "Mask2Former + CLIP detector or the shapes world's"),
              "tokenizer": ("eval.tokenizer_metrics", "a tokenizer's PSNR / SSIM (LlamaGen protocol), rFID "
                                                      "(torch-fidelity's Inception), LPIPS, codebook usage and "
                                                      "zero-shot accuracy on a folder of images"),
              "score": ("eval.scorers", "official scoring of answer files: pope, mme, gqa, vqav2, textvqa, geneval")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
