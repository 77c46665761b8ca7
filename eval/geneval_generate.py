"""``unitok eval geneval``: text-to-image samples for GenEval's prompts, in GenEval's folder layout.

    unitok eval geneval --model DIR --tokenizer PATH --metadata geneval/prompts/evaluation_metadata.jsonl \\
        --out runs/geneval                                   # 553 prompts x 4 images
    unitok eval geneval-score runs/geneval --detector-path M2F --clip-path CLIP

Each prompt is used verbatim (no rewriting). ``<out>/<00000>/metadata.jsonl`` holds the prompt's metadata line and
``<out>/<00000>/samples/<0000>.png`` its images. Sample ``j`` of prompt ``i`` is drawn with its own generator seeded
``seed + 1000 * i + j``, so an image does not depend on the batch it was made in, and a rerun resumes: images already
written are skipped (each PNG is written to a temporary name and renamed, so none is half-written). The settings (CFG
scale, temperature, top-k, top-p, seed, images per prompt, model, tokenizer, metadata) are recorded in
``<out>/run.json``; a rerun with other settings refuses to mix its images in (``--overwrite`` replaces them).
Defaults follow UniTok's own benchmark script (``scripts/generation/genai.sh``: CFG 7, temperature 1, no top-k/p).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

SAMPLE_SEED_STRIDE = 1000  # images per prompt stay below it
OUTPUTS = ("run.json", "[0-9]*", "results.jsonl", "results_summary.json")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return seed + SAMPLE_SEED_STRIDE * prompt_index + sample_index


def read_metadata(path: str | Path) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one ``{tag, include, prompt, exclude?}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GenEval metadata file at {path} (GenEval's prompts/evaluation_metadata.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not JSON ({err.msg})") from None
        missing = [k for k in ("tag", "prompt", "include") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path} line {n}: no {', '.join(missing)} (GenEval metadata has tag, prompt, include)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def write_prompt_folder(out: Path, index: int, metadata: Mapping[str, Any]) -> Path:
    folder = out / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    meta = folder / "metadata.jsonl"
    text = json.dumps(dict(metadata))
    if not meta.is_file() or meta.read_text(encoding="utf-8") != text:
        meta.write_text(text, encoding="utf-8")
    return folder


@torch.no_grad()
def generate_folder(model, processor, unitok, metadata: Sequence[Mapping[str, Any]], out: str | Path,
                    images_per_prompt: int = 4, sampling=None, seed: int = 0, batch_size: int = 8,
                    progress: bool = False) -> int:
    """Write the missing samples of ``metadata``'s prompts under ``out``; returns how many were generated."""
    from tqdm import tqdm

    from mllm.generation import generate_images
    from tokenizer.image import to_pil

    if not 1 <= images_per_prompt < SAMPLE_SEED_STRIDE:
        raise ValueError(f"--images-per-prompt must be 1..{SAMPLE_SEED_STRIDE - 1}, got {images_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out = Path(out)
    jobs = []
    for i, m in enumerate(metadata):
        folder = write_prompt_folder(out, i, m)
        jobs += [(i, j, folder / "samples" / f"{j:04d}.png") for j in range(images_per_prompt)
                 if not (folder / "samples" / f"{j:04d}.png").is_file()]
    device = next(unitok.parameters()).device
    with tqdm(total=len(jobs), desc="GenEval samples", unit="img", disable=not progress or not jobs) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            codes = generate_images(model, processor, [metadata[i]["prompt"] for i, _, _ in batch], sampling,
                                    seeds=[sample_seed(seed, i, j) for i, j, _ in batch])
            pixels = unitok.decode(codes.to(device)).cpu()
            for (_, _, path), px in zip(batch, pixels):
                _save_png(to_pil(px), path)
            bar.update(len(batch))
    return len(jobs)


# ---------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MLLM folder")
    p.add_argument("--tokenizer", required=True, help="UniTok tokenizer (folder or official .pth)")
    p.add_argument("--metadata", required=True, help="GenEval's prompts/evaluation_metadata.jsonl (553 prompts)")
    p.add_argument("--out", required=True, help="GenEval folder layout goes here")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (CFG adds as many rows)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt i uses seed + 1000 i + j")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="replace the images of another run in --out")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from mllm.cli import load_mllm, load_unitok
    from mllm.generation import ImageSampling

    from .vqa_runner import claim_run

    sampling = ImageSampling(args.cfg, args.temperature, args.top_k, args.top_p)
    metadata = read_metadata(args.metadata)[:args.limit]
    out = Path(args.out)
    run_id = {"model": str(Path(args.model).resolve()), "tokenizer": str(Path(args.tokenizer).resolve()),
              "metadata": hashlib.sha256(Path(args.metadata).read_bytes()).hexdigest()[:16],
              "images_per_prompt": args.images_per_prompt, "cfg_scale": args.cfg, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "seed_rule": "seed + 1000 * prompt_index + sample_index", "dtype": args.dtype or "model's"}
    claim_run(out, run_id, args.overwrite, writer=True, outputs=OUTPUTS)
    model, processor = load_mllm(args.model, args.device, args.dtype)
    unitok = load_unitok(args.tokenizer, model, model.device)
    n = generate_folder(model, processor, unitok, metadata, out, args.images_per_prompt, sampling, args.seed,
                        args.batch_size, progress=True)
    print(f"{n} images generated, {len(metadata) * args.images_per_prompt - n} already there; "
          f"{len(metadata)} prompts in {out}\nscore them: unitok eval geneval-score {out} ...")
    return 0
