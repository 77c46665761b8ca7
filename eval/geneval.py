"""``unitok eval geneval-score DIR``: GenEval's rules (``metrics/geneval.py``) over a GenEval-layout folder, with
either detector: the transformers Mask2Former + CLIP port of GenEval's models (``eval/geneval_hf.py``; the figure is
"GenEval (transformers detector)") or the shapes world's exact detector (``shapes/geneval.py``).

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
from typing import Any, Iterable, Iterator, Mapping

from metrics.geneval import Detector, format_summary, score_image, summarize
from shapes.geneval import ShapesDetector

from .geneval_hf import Mask2FormerDetector

__all__ = ["prompt_folders", "score_folder", "write_results", "build_detector", "run"]


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
        return ShapesDetector()
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
