"""Score a tokenizer + MLLM pair on the shapes world: tokenizer PSNR, VQA accuracy, GenEval-style generation.

``unitok eval shapes --model DIR --tokenizer PATH [--scenes 200 --prompts-per-tag 20 --images-per-prompt 1]``
runs the same scoring the demo prints, on any checkpoint whose tokenizer works at the world's 64 px.

The VQA prompt is the chat template with ``<image>\\n<question> Answer the question using a single word or phrase.``
(LLaVA's short-answer suffix), decoded greedily; answers are scored with the official VQA normalisation.
Generation follows GenEval: every prompt gets ``images_per_prompt`` samples (seeded), each image is scored by the
world's exact detector under GenEval's per-tag rules, and the overall score is the mean of the per-tag accuracies.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.generation import ImageSampling, TextSampling, generate_replies
from shapes import world as W
from shapes.geneval import ShapesDetector, score_image, summarize
from shapes.suite import VQA_SUFFIX, test_scenes

from ..geneval import score_folder
from ..geneval_generate import generate_folder
from .export import export
from .vqa import score_vqa


def vqa_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>\n{question}{VQA_SUFFIX}"}]


def images_tensor(scenes: list[W.Scene], size: int) -> torch.Tensor:
    """Rendered scenes as ``[B, 3, size, size]`` in [-1, 1]."""
    arr = np.stack([W.render_array(s, size) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1)


@torch.no_grad()
def encode_scenes(unitok, scenes: list[W.Scene], batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
    """Codes of the rendered scenes; ``progress``: show a progress bar with this label."""
    from tqdm import tqdm

    size = unitok.config.image_size
    device = next(unitok.parameters()).device
    starts = tqdm(range(0, len(scenes), batch_size), desc=progress, unit="batch", disable=progress is None,
                  dynamic_ncols=True)
    return torch.cat([unitok.encode(images_tensor(scenes[i:i + batch_size], size).to(device)).cpu()
                      for i in starts])


@torch.no_grad()
def tokenizer_psnr(unitok, scenes: list[W.Scene], batch_size: int = 64) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of encode -> decode on rendered scenes."""
    size = unitok.config.image_size
    device = next(unitok.parameters()).device
    values = []
    for i in range(0, len(scenes), batch_size):
        x = images_tensor(scenes[i:i + batch_size], size).to(device)
        rec = unitok.decode(unitok.encode(x))
        mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
        values += (-10 * torch.log10(mse.clamp_min(1e-10))).tolist()
    return float(np.mean(values))


@torch.no_grad()
def answer(model, processor, codes: torch.Tensor, questions: list[str], batch_size: int = 32,
           max_new_tokens: int = 4) -> list[str]:
    """Greedy short answers; ``codes[i]`` ``[K, N]`` is the image of ``questions[i]``. Batched with left padding."""
    out = []
    for i in range(0, len(questions), batch_size):
        rows = [processor.chat_prompt(vqa_messages(q)) for q in questions[i:i + batch_size]]
        out += generate_replies(model, processor, rows, codes[i:i + batch_size].to(model.device),
                                TextSampling(max_new_tokens=max_new_tokens))
    return out


def evaluate_vqa(model, processor, unitok, scenes: list[W.Scene], batch_size: int = 32,
                 wording: str = "canonical", image_shift: int = 0) -> dict[str, Any]:
    """Accuracy on the scenes' questions in one wording (``world.WORDING_STYLES``): ``canonical`` is the test set,
    ``paraphrase`` the same questions in the held-out wording. ``image_shift=1`` is the image-blind control: each
    question is asked about the next scene's image (an answer that does not move reads only the question)."""
    codes = encode_scenes(unitok, scenes)
    items = [(i, q) for i, s in enumerate(scenes) for q in W.questions(s, wording=wording)]
    image_of = [(i + image_shift) % len(scenes) for i, _ in items]
    preds = answer(model, processor, codes[image_of], [q["question"] for _, q in items], batch_size)
    result = score_vqa(preds, [q for _, q in items])
    result["examples"] = [{"scene": scenes[i].id, **q, "prediction": p} for (i, q), p in zip(items, preds)]
    return result


def evaluate_generation(model, processor, unitok, prompts: list[dict], images_per_prompt: int = 1,
                        sampling: ImageSampling | None = None, seed: int = 0, batch_size: int = 16,
                        out_dir: Path | None = None) -> dict[str, Any]:
    """GenEval's path end to end: ``unitok eval geneval``'s generation into GenEval's folder layout (``out_dir``, or
    a temporary folder), then ``unitok eval geneval-score --detector shapes`` on it (GenEval's rules with the exact
    detector). Returns the summary, the result records (sample order) and the images ``[n, 3, H, W]``."""
    import tempfile

    from tokenizer.image import load_image, to_tensor

    sampling = sampling or ImageSampling(cfg_scale=3.0, temperature=1.0, top_k=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        generate_folder(model, processor, unitok, prompts, folder, images_per_prompt, sampling, seed, batch_size)
        results, unreadable = score_folder(folder, ShapesDetector())
        if unreadable:
            raise ValueError(unreadable[0])
        images = [to_tensor(load_image(r["filename"])) for r in results]
    return {"summary": summarize(results), "results": results, "images": torch.stack(images) if images else None}


def vqa_through_runner(model_dir: str | Path, tokenizer_dir: str | Path, scenes: list[W.Scene], out: Path,
                       batch_size: int = 32) -> dict[str, Any]:
    """The scenes' questions the way a benchmark is run: exported in the VQAv2 layout (``unitok eval shapes-export``),
    answered by ``unitok eval vqa --benchmark vqav2 --max-new-tokens 4`` and scored by the official VQA scorer
    (``--annotations``). Returns the runner's ``results.json``; its ``scores`` (overall, perQuestionType by question
    type) equal :func:`evaluate_vqa`'s accuracy to the official 2 decimals (tested)."""
    import contextlib
    import io

    from .. import vqa_runner  # loads transformers' tokenizers: only when a benchmark is run

    export(out / "files", scenes)
    p = argparse.ArgumentParser()
    vqa_runner.add_arguments(p)
    args = p.parse_args(["--benchmark", "vqav2", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir),
                         "--data", str(out / "files" / "vqav2"), "--out", str(out / "vqav2"), "--max-new-tokens", "4",
                         "--batch-size", str(batch_size), "--annotations",
                         str(out / "files" / "vqav2" / "v2_mscoco_val2014_annotations.json"), "--overwrite"])
    with contextlib.redirect_stdout(io.StringIO()):  # the caller prints the figure
        vqa_runner.run(args)
    return json.loads((out / "vqav2" / "results.json").read_text())


@torch.no_grad()
def reconstruction_ceiling(unitok, prompts: list[dict], seed: int = 0) -> dict[str, Any]:
    """GenEval rules on the tokenizer's reconstructions of scenes drawn exactly as each prompt says: the score a
    generator that reproduced its training distribution perfectly would get through this tokenizer."""
    from tokenizer.image import to_pil

    rng = np.random.default_rng(seed)
    scenes = [W.scene_for_prompt(m, rng) for m in prompts]
    device = next(unitok.parameters()).device
    rec = unitok.decode(unitok.encode(images_tensor(scenes, unitok.config.image_size).to(device))).cpu()
    return summarize([score_image(to_pil(px), m) for px, m in zip(rec, prompts)])


# ---------------------------------------------------------------------------- CLI: unitok eval shapes
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MLLM folder")
    p.add_argument("--tokenizer", required=True, help="UniTok tokenizer (64 px for this world)")
    p.add_argument("--scenes", type=int, default=200, help="test scenes for VQA and PSNR")
    p.add_argument("--prompts-per-tag", type=int, default=20, help="GenEval-style prompts per tag (seed 43)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="test-scene draw and sampling seed (as `unitok demo --seed`)")
    p.add_argument("--out", default=None, help="folder for results.json and generated images")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--device", default=None)


EVAL_OUTPUTS = ("results.json", "geneval")


def run(args: argparse.Namespace) -> int:
    from mllm.cli import load_mllm, load_unitok
    from tokenizer.checkpoint import claim_output

    if args.out:
        claim_output(args.out, args.overwrite, EVAL_OUTPUTS)
    model, processor = load_mllm(args.model, args.device)
    unitok = load_unitok(args.tokenizer, model, model.device)
    scenes = test_scenes(args.scenes, args.seed)
    prompts = W.geneval_prompts(args.prompts_per_tag)
    out = Path(args.out) if args.out else None
    t = time.perf_counter()
    psnr = tokenizer_psnr(unitok, scenes)
    vqa = evaluate_vqa(model, processor, unitok, scenes)
    gen = evaluate_generation(model, processor, unitok, prompts, args.images_per_prompt,
                              ImageSampling(args.cfg, args.temperature, args.top_k), args.seed,
                              out_dir=out / "geneval" if out else None)
    print(format_scores(psnr, vqa, gen["summary"]))
    print(f"({time.perf_counter() - t:.0f} s)")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            {"psnr": psnr, "vqa": {k: v for k, v in vqa.items() if k != "scores"}, "geneval": gen["summary"]},
            indent=1))
    return 0


def format_scores(psnr: float, vqa: dict, gen: dict) -> str:
    lines = [f"tokenizer PSNR (test images)     {psnr:6.2f} dB",
             f"VQA accuracy (test questions)    {100 * vqa['accuracy']:6.1f} %   (n={vqa['n']})"]
    lines += [f"    {t:<28} {100 * a:6.1f} %" for t, a in sorted(vqa["per_type"].items())]
    lines.append(f"GenEval-style overall            {gen['overall']:6.3f}    ({gen['n_images']} images, "
                 f"{gen['n_prompts']} prompts)")
    lines += [f"    {t:<28} {a:6.3f}" for t, a in gen["per_task"].items()]
    return "\n".join(lines)


__all__ = ["tokenizer_psnr", "reconstruction_ceiling", "encode_scenes", "answer", "evaluate_vqa",
           "evaluate_generation", "vqa_through_runner",
           "format_scores", "vqa_messages", "VQA_SUFFIX", "images_tensor"]
