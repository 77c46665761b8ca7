"""``unitok demo``: the whole system, end to end, in the shapes world, on a CPU.

Stages (each cached under ``--cache-dir``; a second run reuses every stage whose settings did not change):

1. ``tokenizer``  train the UniTok ``tiny`` tokenizer on rendered world scenes (configs/tokenizer/demo.yaml);
2. ``data``       encode the training scenes to codes, train a sentencepiece text tokenizer, write the MLLM data:
                  caption pairs (both directions), prompt->image pairs for GenEval's six tags, VQA conversations;
3. ``pretrain``   the tiny MLLM on a mixture of captions both ways, prompt->image pairs and VQA conversations
                  (configs/recipes/demo-pretrain.yaml);
4. ``instruct``   instruction tuning weighted towards VQA (without the position questions), text->image kept in
                  the mix (demo-instruct.yaml), in three runs: the mixture, existence, count and colour questions
                  alone (demo-selection.yaml), the mixture again at half the learning rate (why: demo-selection.yaml);
5. ``eval``       tokenizer PSNR on test scenes, VQA accuracy on their questions, GenEval-style scores on the test
                  prompt suite; a few answers, a PNG grid of generations, and the score table with stage times.

``--size smoke`` runs every stage in seconds (the test suite does); ``--size full`` is the README's figure.
``--curves`` adds per-type VQA learning curves: the MLLM runs export snapshots (``train.snapshot_every``), each
scored on the test scenes and as many training scenes (``curves/curves.json``, and a table in the printout).
``--ablation`` runs the whole chain twice, after a reconstruction-only and a reconstruction + contrastive tokenizer,
and prints the paper's ablation table (PSNR, per-position probe of the codes, VQA, GenEval-style).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import logging
import shutil
import textwrap
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

import configs
import shapes.world

logger = logging.getLogger("unitok.demo")


@dataclass(frozen=True)
class DemoSize:
    tokenizer_steps: int
    train_scenes: int  # scenes with captions and questions
    prompt_scenes: int  # extra prompt->image scenes per GenEval tag
    pretrain_steps: int
    instruct_steps: int  # the instruction mixture
    selection_steps: int  # then existence, count and colour questions alone
    consolidate_steps: int  # then the mixture again, at half the learning rate
    test_scenes: int
    prompts_per_tag: int
    batch_size: int = 16  # MLLM packed rows per step
    max_tokens: int = 256


SIZES = {
    "smoke": DemoSize(tokenizer_steps=4, train_scenes=48, prompt_scenes=8, pretrain_steps=3, instruct_steps=3,
                      selection_steps=2, consolidate_steps=2, test_scenes=6, prompts_per_tag=2, batch_size=2,
                      max_tokens=256),
    "small": DemoSize(tokenizer_steps=600, train_scenes=2000, prompt_scenes=400, pretrain_steps=300,
                      instruct_steps=300, selection_steps=100, consolidate_steps=100, test_scenes=100,
                      prompts_per_tag=10),
    "full": DemoSize(tokenizer_steps=2000, train_scenes=8000, prompt_scenes=4000, pretrain_steps=1500,
                     instruct_steps=500, selection_steps=300, consolidate_steps=300, test_scenes=200,
                     prompts_per_tag=20),
}


# ================================================================================================ time budget
# The budget: each stage's seconds at the full size on the reference machine (2 threads of an Intel Xeon with
# AVX512-BF16 and AMX), under each tokenizer precision `auto` can pick there. Another machine's estimate scales each
# stage by how much slower this machine runs the stage's own workload, timed before the first stage: a few steps of
# the tokenizer stage's own trainer and of the demo's MLLM (~8 s on the reference machine). A matmul's GFLOP/s
# predicts the stages badly: the tiny models are bound by small kernels and convolutions as much as by large matmuls
# (an AVX2-only AMD EPYC at 34 fp32 GFLOP/s, 5.3x below the reference, ran the MLLM stages 2x and the fp32 tokenizer
# 2.7x slower). The run is announced as "within" 1.3x the estimate: the probe's noise and a slow day.
REFERENCE_SECONDS = {"tokenizer": {"bf16": 465.0, "no": 560.0}, "data": 52.0, "pretrain": 688.0, "instruct": 447.0,
                     "eval": 35.0, "curves": 205.0}
# the workload probe on the reference machine (medians over the session; the tokenizer's varies 0.18-0.38 s)
REFERENCE_STEP_SECONDS = {"tokenizer": {"bf16": 0.30, "no": 0.30}, "mllm": 0.47}
STAGE_WORKLOAD = {"tokenizer": "tokenizer", "data": "tokenizer", "pretrain": "mllm", "instruct": "mllm",
                  "eval": "mllm", "curves": "mllm"}
BOUND_FACTOR = 1.3  # the announced upper bound: the probe's noise (~10 %) and a slow day (~15 %)
STAGE_OVERHEAD_SECONDS = 3.0  # building models, loading data: what dominates the smoke size
BUDGET_MINUTES = 30  # the whole full-size demo on the reference machine


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def stage_work(size: DemoSize) -> dict[str, float]:
    """Each stage's work relative to the full size (its reference seconds scale with it)."""
    from shapes.world import GENEVAL_TAGS

    full = SIZES["full"]
    scenes = lambda s: s.train_scenes + len(GENEVAL_TAGS) * s.prompt_scenes  # noqa: E731
    instr = lambda s: s.instruct_steps + s.selection_steps + s.consolidate_steps  # noqa: E731
    return {"tokenizer": size.tokenizer_steps / full.tokenizer_steps, "data": scenes(size) / scenes(full),
            "pretrain": size.pretrain_steps / full.pretrain_steps, "instruct": instr(size) / instr(full),
            "eval": size.test_scenes / full.test_scenes, "curves": size.test_scenes / full.test_scenes}


def _median_step_seconds(step, repeats: int = 3) -> float:
    step()  # warm-up: kernel selection (oneDNN JIT), allocator
    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def workload_step_seconds(tokenizer_precision: str) -> dict[str, float]:
    """Seconds per training step, on this machine, of the demo's tokenizer stage (its trainer and recipe, on world
    scenes, in the precision chosen; a throwaway folder) and of its MLLM (the recipe's model, 16 rows of 256 random
    tokens, fp32). The random state is restored afterwards, so the stages that follow are unchanged."""
    import random
    import tempfile

    from mllm import UniTokMLLM, UniTokMLLMConfig
    from mllm.configuration import image_side_from_tokenizer
    from train.mllm.config import MLLMTrainConfig
    from train.tokenizer.config import TokenizerTrainConfig
    from train.tokenizer.trainer import TokenizerTrainer

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    quiet = [logging.getLogger(n) for n in ("unitok.precision", "train.tokenizer.trainer")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:  # the probe's trainer is not the run: its start-up lines would read as the stage's
            q.setLevel(logging.WARNING)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TokenizerTrainConfig.load(configs.path("tokenizer", "demo.yaml"),
                                            [f"train.output_dir={tmp}", f"train.mixed_precision={tokenizer_precision}",
                                             "train.tensorboard=false"])
            trainer = TokenizerTrainer(cfg)
            batches = iter(trainer.stream)
            tokenizer = _median_step_seconds(lambda: trainer.train_step(next(batches)))
            image_side = image_side_from_tokenizer(trainer.unwrapped.config)
        recipe = MLLMTrainConfig.load(configs.path("recipes", "demo-pretrain.yaml")).model
        model_cfg = UniTokMLLMConfig.from_preset(recipe.preset, **{"vocab_size": 640, **image_side,
                                                                   **recipe.overrides})
        torch.manual_seed(0)
        model = UniTokMLLM(model_cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids, labels, codes = mllm_probe_batch(model_cfg)

        def mllm_step():
            model(input_ids=ids, labels=labels, image_codes=codes, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return {"tokenizer": tokenizer, "mllm": _median_step_seconds(mllm_step)}
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def mllm_probe_batch(cfg, rows: int = 16, row_tokens: int = 256, text_tokens: int = 24):
    """The demo's micro-batch shape with its mix of work: each row holds prompt -> image samples (random text, then
    boi, the image's positions, eoi) until full, the image codes a target as in text-to-image training (the code
    embedder and the depth head run, not only the backbone)."""
    from mllm import IGNORE_INDEX

    n, img = cfg.image_positions, cfg.image_placeholder_id
    sample = [1, *range(5, 5 + text_tokens), cfg.boi_token_id, *[img] * n, cfg.eoi_token_id, 2]
    per_row = row_tokens // len(sample)
    row = (sample * per_row + [0] * row_tokens)[:row_tokens]
    ids = torch.tensor([row] * rows)
    labels = ids.clone()
    labels[ids == 0] = IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.codebook_size, (rows * per_row, cfg.num_codebooks, n), generator=g)
    return ids, labels, codes


def estimate_seconds(size: DemoSize, step_seconds: dict[str, float], tokenizer_precision: str,
                     stages: list[str]) -> dict[str, float]:
    """Seconds each of ``stages`` should take here, from the workload probe's step times."""
    work = stage_work(size)
    ref_steps = {"tokenizer": REFERENCE_STEP_SECONDS["tokenizer"][tokenizer_precision],
                 "mllm": REFERENCE_STEP_SECONDS["mllm"]}
    out = {}
    for stage in stages:
        ref = REFERENCE_SECONDS[stage]
        ref = ref[tokenizer_precision] if isinstance(ref, dict) else ref
        workload = STAGE_WORKLOAD[stage]
        slowdown = step_seconds[workload] / ref_steps[workload]
        out[stage] = (STAGE_OVERHEAD_SECONDS + ref * work[stage]) * slowdown
    return out


def announce_machine(size: DemoSize, tokenizer_precision: str, why: str, stages: list[str]) -> dict:
    """Print the machine line and the run's estimate before the first stage; returned for results.json."""
    from train.common.precision import machine_info

    info = machine_info()
    reference = {"tokenizer": REFERENCE_STEP_SECONDS["tokenizer"][tokenizer_precision],
                 "mllm": REFERENCE_STEP_SECONDS["mllm"]}
    # the workload probe costs seconds: not worth it for a run that takes a minute or two on the reference machine
    quick = sum(estimate_seconds(size, reference, tokenizer_precision, stages).values()) < 120
    steps = reference if quick else workload_step_seconds(tokenizer_precision)
    est = estimate_seconds(size, steps, tokenizer_precision, stages)
    total = sum(est.values())
    print(f"machine: {info.describe()}")
    print(f"precision: tokenizer {'bf16 autocast' if tokenizer_precision == 'bf16' else 'fp32'} ({why}); "
          f"MLLM fp32")
    if not stages:
        print("estimate: every stage is cached", flush=True)
    elif quick:
        print(f"estimate: {minutes(total)} on the reference machine, within {minutes(BOUND_FACTOR * total)}",
              flush=True)
    else:
        print(f"estimate: {minutes(total)} here, within {minutes(BOUND_FACTOR * total)} ({', '.join(f'{k} {minutes(v)}' for k, v in est.items())}; "
              f"a training step takes {steps['tokenizer']:.2f} s (tokenizer) and {steps['mllm']:.2f} s (MLLM) "
              f"here against {REFERENCE_STEP_SECONDS['tokenizer'][tokenizer_precision]:.2f} and "
              f"{REFERENCE_STEP_SECONDS['mllm']:.2f} on the reference machine; budget: {BUDGET_MINUTES} min for "
              f"the full demo there)", flush=True)
    return {**info.to_dict(), "tokenizer_precision": tokenizer_precision, "precision_reason": why,
            "step_seconds": None if quick else steps, "estimate_seconds": {k: round(v) for k, v in est.items()},
            "estimate_total_seconds": round(total)}


# ================================================================================================ caching
class Stage:
    """A cached stage: ``<cache>/<name>/`` plus ``stage.json`` holding the settings it was built with."""

    def __init__(self, cache: Path, name: str, settings: dict) -> None:
        self.dir, self.name, self.settings = cache / name, name, settings
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cached(self) -> float | None:
        marker = self.dir / "stage.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            if info.get("key") == self.key:
                return float(info["seconds"])
        return None

    def run(self, fn) -> tuple[float, bool]:
        seconds = self.cached()
        if seconds is not None:
            logger.info("stage %s: cached (%s)", self.name, self.dir)
            return seconds, True
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        t = time.perf_counter()
        fn(self.dir)
        seconds = time.perf_counter() - t
        (self.dir / "stage.json").write_text(json.dumps({"key": self.key, "settings": self.settings,
                                                         "seconds": seconds}, default=str, indent=1))
        return seconds, False


# ================================================================================================ stages
# The paper's thesis in miniature (`unitok demo --ablation`): the same tokenizer recipe with its CLIP term on (the
# text tower trained contrastively on the world's captions, weight 1 as the release), then the same MLLM budget.
CONTRASTIVE = ["loss.clip=1.0"]


def train_tokenizer(out: Path, size: DemoSize, seed: int, overrides: list[str] = ()) -> None:
    from train.tokenizer.config import TokenizerTrainConfig
    from train.tokenizer.trainer import train

    cfg = TokenizerTrainConfig.load(configs.path("tokenizer", "demo.yaml"),
                                    [f"train.steps={size.tokenizer_steps}", f"train.output_dir={out / 'run'}",
                                     f"optim.warmup_steps={round(0.05 * size.tokenizer_steps)}",  # 5 %, every size
                                     f"data.shapes_seed={seed}", *overrides])
    train(cfg)
    shutil.move(str(out / "run" / "model"), str(out / "model"))


def chat_template_name() -> str:
    """The demo model's chat template, as its pretraining recipe builds the model (instruct inherits it)."""
    from mllm import UniTokMLLMConfig
    from train.mllm.config import MLLMTrainConfig

    model = MLLMTrainConfig.load(configs.path("recipes", "demo-pretrain.yaml")).model
    return UniTokMLLMConfig.from_preset(model.preset, **model.overrides).chat_template


def texts_for_tokenizer(scenes, prompt_meta, template: str) -> list[str]:
    from shapes import world as W
    from shapes.suite import VQA_SUFFIX
    from mllm.conversation import get_template

    t = get_template(template)
    texts = [x for x in (t.system, t.t2i_suffix.strip(), t.unconditional_prompt, VQA_SUFFIX.strip(), "USER: ASSISTANT:")
             if x]
    for s in scenes:
        texts += W.captions(s)
        texts += [q["question"] + " " + q["answer"] for q in W.questions(s, wording="varied")]
    texts += [m["prompt"] for m in prompt_meta]
    texts += [draw_request(m["prompt"], k) for m in prompt_meta[:len(DRAW_REQUESTS) * 20]
              for k in range(len(DRAW_REQUESTS))]
    return texts


DRAW_REQUESTS = ("Draw {}.", "Can you draw {}?", "Show me {}.", "Make a picture of {}.", "Please draw {}.")


def draw_request(prompt: str, k: int = 0) -> str:
    """A chat request for the picture a GenEval-style prompt describes: "a photo of a red circle" -> "Draw a red
    circle." (``k`` picks the wording; 0 is the one the demo scores)."""
    return DRAW_REQUESTS[k].format(prompt.removeprefix("a photo of ").strip())


def build_data(out: Path, tokenizer_dir: Path, size: DemoSize, seed: int, template: str) -> None:
    """Codes of every training image, the text tokenizer, and the MLLM's JSONL sources."""
    from shapes import world as W
    from eval.shapes.evaluate import encode_scenes
    from tokenizer import UniTok
    from train.text_tokenizer import train_sentencepiece

    unitok = UniTok.from_pretrained(tokenizer_dir).eval()
    rng = np.random.default_rng(seed)
    logger.info("data: drawing %d training scenes and %d prompt scenes per tag", size.train_scenes, size.prompt_scenes)
    scenes = W.generate_split("train", size.train_scenes, seed=seed)
    prompt_meta, prompt_scenes = [], []
    for tag in W.GENEVAL_TAGS:
        space = W.enumerate_prompts(tag)
        for _ in range(size.prompt_scenes):
            meta = space[int(rng.integers(len(space)))]
            for _attempt in range(50):  # only training layouts
                try:
                    scene = W.scene_for_prompt(meta, rng)  # exactly what the prompt says, nothing else
                except ValueError:
                    continue
                if W.scene_split(scene) == "train":
                    prompt_meta.append(meta)
                    prompt_scenes.append(scene)
                    break
    codes = encode_scenes(unitok, scenes + prompt_scenes, progress="data: encoding scenes").tolist()
    scene_codes, prompt_codes = codes[:len(scenes)], codes[len(scenes):]

    logger.info("data: training the text tokenizer (sentencepiece, 640 pieces)")
    train_sentencepiece(texts_for_tokenizer(scenes, prompt_meta, template), out / "text_tokenizer", vocab_size=640)
    logger.info("data: writing captions, prompts, ask-and-draw turns and VQA conversations to %s", out)
    with open(out / "captions.jsonl", "w") as f:
        for s, c in zip(scenes, scene_codes):
            f.write(json.dumps({"id": s.id, "text": W.captions(s), "codes": c}) + "\n")
    # prompt->image pairs depict their prompt exactly: training on scenes that merely *satisfy* a prompt ("a photo
    # of a circle" for four objects) taught the model to ignore counts and colours (see the README's demo notes)
    with open(out / "prompts.jsonl", "w") as f:
        for s, meta, c in zip(prompt_scenes, prompt_meta, prompt_codes):
            f.write(json.dumps({"id": s.id, "text": meta["prompt"], "codes": c}) + "\n")
    # ask-and-draw chat turns (instruction mixture): the assistant answers "Draw ..." with boi + the image codes
    with open(out / "draw.jsonl", "w") as f:
        for s, meta, c in zip(prompt_scenes, prompt_meta, prompt_codes):
            request = draw_request(meta["prompt"], int(rng.integers(len(DRAW_REQUESTS))))
            f.write(json.dumps({"id": s.id, "conversations": [{"from": "human", "value": request},
                                                              {"from": "gpt", "value": "<image>"}],
                                "codes": [c]}) + "\n")
    # vqa.jsonl: every question (pretraining); vqa_without_position.jsonl: the same conversations without the
    # position questions (instruction tuning; why in demo-instruct.yaml); exists.jsonl, count.jsonl, color.jsonl:
    # every existence, count and colour question, each a conversation of its own (the second run of instruction
    # tuning; why in demo-selection.yaml)
    with open(out / "vqa.jsonl", "w") as f, open(out / "vqa_without_position.jsonl", "w") as g, ExitStack() as stack:
        alone = {t: stack.enter_context(open(out / f"{t}.jsonl", "w")) for t in ("exists", "count", "color")}
        for s, c in zip(scenes, scene_codes):
            qs = W.questions(s, wording="varied")  # the held-out paraphrases stay out of training
            for q in qs:
                if q["type"] in alone:
                    alone[q["type"]].write(vqa_record(s.id, [q], c))
            order = rng.permutation(len(qs))
            # half single-question conversations (the eval format), half multi-turn over the same image
            for chunk in ([[int(i)] for i in order[:3]] + [[int(i) for i in order[3:]]]):
                if chunk:
                    f.write(vqa_record(s.id, [qs[i] for i in chunk], c))
                kept = [qs[i] for i in chunk if qs[i]["type"] != "position"]
                if kept:
                    g.write(vqa_record(s.id, kept, c))


def vqa_record(scene_id: str, questions: list[dict], codes: list) -> str:
    """One JSONL line: a conversation asking ``questions`` in turn about one image (``<image>`` in the first)."""
    from shapes.suite import VQA_SUFFIX

    conv = []
    for k, q in enumerate(questions):
        prefix = "<image>\n" if k == 0 else ""
        conv += [{"from": "human", "value": f"{prefix}{q['question']}{VQA_SUFFIX}"},
                 {"from": "gpt", "value": q["answer"]}]
    return json.dumps({"id": scene_id, "conversations": conv, "codes": [codes]}) + "\n"


def train_mllm(out: Path, recipe: str, data_dir: Path, tokenizer_dir: Path, steps: int, size: DemoSize,
               seed: int, init: str | None, recipe_overrides: list[str] = ()) -> None:
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainer import train

    overrides = [f"train.steps={steps}", f"train.output_dir={out / 'run'}", f"train.seed={seed}",
                 f"optim.warmup_steps={min(50, steps // 10)}",
                 f"data.seed={seed}", f"data.batch_size={size.batch_size}", f"data.max_tokens={size.max_tokens}",
                 f"model.tokenizer={tokenizer_dir}", f"model.text_tokenizer={data_dir / 'text_tokenizer'}"]
    if init:
        overrides += ["model.preset=null", f"model.pretrained={init}"]
    overrides += list(recipe_overrides)
    cfg = MLLMTrainConfig.load(configs.path("recipes", recipe), overrides)
    cfg = replace(cfg, data=replace(cfg.data, sources=[
        replace(s, paths=[str(data_dir / Path(p).name) for p in s.paths]) for s in cfg.data.sources]))
    train(cfg)  # a run of its own, with its own precision (the trainers reset accelerate's per-process state)
    shutil.move(str(out / "run" / "final"), str(out / "model"))


def instruct_phases(size: DemoSize) -> list[tuple[str, int, list[str]]]:
    """Instruction tuning as (recipe, steps, overrides) runs, each from the previous one's model: the mixture, then
    existence, count and colour questions alone, then the mixture again at half its learning rate (why:
    demo-selection.yaml)."""
    from train.mllm.config import MLLMTrainConfig

    mixture_lr = MLLMTrainConfig.load(configs.path("recipes", "demo-instruct.yaml")).optim.lr
    return [("demo-instruct.yaml", size.instruct_steps, []),
            ("demo-selection.yaml", size.selection_steps, []),
            ("demo-instruct.yaml", size.consolidate_steps, [f"optim.lr={mixture_lr / 2}"])]


def phase_dir(out: Path, k: int, recipe: str) -> Path:
    return out / f"{k}-{Path(recipe).stem}"


def instruct(out: Path, phases, data_dir: Path, tokenizer_dir: Path, size: DemoSize, seed: int, init: Path) -> None:
    """Run ``phases`` in turn under ``out/<k>-<recipe>/``; the last one's model is ``out/model``."""
    for k, (recipe, steps, overrides) in enumerate(phases):
        run = phase_dir(out, k, recipe)
        train_mllm(run, recipe, data_dir, tokenizer_dir, steps, size, seed, str(init), overrides)
        init = run / "model"
    shutil.move(str(init), str(out / "model"))


# ================================================================================================ learning curves
CURVE_POINTS = 10  # snapshots per MLLM run with --curves; a run's final model is its last point


def snapshot_override(steps: int) -> list[str]:
    return [f"train.snapshot_every={max(1, steps // CURVE_POINTS)}"]


def learning_curves(out: Path, runs: list[tuple[str, int, Path, Path]], tokenizer_dir: Path, size: DemoSize,
                    seed: int) -> None:
    """Per-type VQA of every snapshot of the MLLM runs (``--curves``) on the demo's test scenes and on as many
    training scenes (the eval stage's ``train_scenes``), into ``out/curves.json``. ``runs``: (name, steps, the
    stage folder holding ``run/``, its final model) in training order; steps are counted from the first run."""
    from tqdm import tqdm

    from shapes import world as W
    from eval.shapes.evaluate import evaluate_vqa
    from shapes.suite import test_scenes
    from mllm.cli import load_mllm, load_unitok
    from train.mllm.trainer import snapshots

    points, offset = [], 0
    for name, steps, stage_dir, final in runs:
        points += [(name, offset + step, folder) for step, folder in snapshots(stage_dir / "run")]
        points.append((name, offset + steps, final))
        offset += steps
    scenes = {"test": test_scenes(size.test_scenes, seed),
              "train": W.generate_split("train", size.test_scenes, seed=seed)}
    unitok, curves = None, []
    for name, step, folder in tqdm(points, desc="curves: scoring snapshots", unit="model", dynamic_ncols=True):
        model, processor = load_mllm(str(folder), device="cpu")
        unitok = unitok or load_unitok(str(tokenizer_dir), model, model.device)
        point = {"run": name, "step": step, "model": str(folder)}
        for split, split_scenes in scenes.items():
            r = evaluate_vqa(model, processor, unitok, split_scenes)
            point[split] = {"accuracy": r["accuracy"], "per_type": r["per_type"]}
        curves.append(point)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))


def format_curves(curves: list[dict]) -> str:
    """VQA per type (test scenes) and overall (test, training scenes) against the MLLM step."""
    types = sorted(curves[0]["test"]["per_type"])
    lines = ["VQA learning curves (%, test scenes; train: training scenes)",
             f"  {'step':>5}  {'run':<18}" + "".join(f"{t:>9}" for t in types) + f"{'all':>9}{'train':>9}"]
    for c in curves:
        lines.append(f"  {c['step']:>5}  {c['run']:<18}" +
                     "".join(f"{100 * c['test']['per_type'].get(t, float('nan')):9.1f}" for t in types) +
                     f"{100 * c['test']['accuracy']:9.1f}{100 * c['train']['accuracy']:9.1f}")
    return "\n".join(lines)


def evaluate(out: Path, model_dir: Path, tokenizer_dir: Path, size: DemoSize, seed: int) -> None:
    from shapes import world as W
    from eval.shapes.evaluate import (evaluate_generation, evaluate_vqa, reconstruction_ceiling, tokenizer_psnr,
                                      vqa_through_runner)
    from shapes.suite import test_scenes
    from mllm.cli import load_mllm, load_unitok
    from mllm.generation import ImageSampling
    from tokenizer.image import make_grid
    from tqdm import tqdm

    model, processor = load_mllm(str(model_dir), device="cpu")
    unitok = load_unitok(str(tokenizer_dir), model, model.device)
    scenes = test_scenes(size.test_scenes, seed)
    prompts = W.geneval_prompts(size.prompts_per_tag)
    sampling = ImageSampling(cfg_scale=3.0, temperature=1.0)
    # diagnostics: the same questions reworded (held-out paraphrases), about another scene's image (does the answer
    # use the image?), and on training scenes (memorising or underfitting?); then the same test questions as benchmark
    # files through `unitok eval vqa` and the official scorer
    vqa_parts = {
        "psnr": lambda: tokenizer_psnr(unitok, scenes),
        "vqa": lambda: evaluate_vqa(model, processor, unitok, scenes),
        "paraphrase": lambda: evaluate_vqa(model, processor, unitok, scenes, wording="paraphrase"),
        "wrong_image": lambda: evaluate_vqa(model, processor, unitok, scenes, image_shift=1),
        "train_scenes": lambda: evaluate_vqa(model, processor, unitok,
                                             W.generate_split("train", size.test_scenes, seed=seed)),
        "runner": lambda: vqa_through_runner(model_dir, tokenizer_dir, scenes, out / "benchmarks")}
    # plain sampling with guidance (greedy decoding collapses to one image per model, as in other AR generators)
    gen_parts = {
        "geneval": lambda: evaluate_generation(model, processor, unitok, prompts, 1, sampling, seed=seed,
                                               out_dir=out / "geneval"),
        "chat_drawing": lambda: evaluate_chat_drawing(model, processor, unitok, prompts, seed),
        "ceiling": lambda: reconstruction_ceiling(unitok, prompts, seed)}
    done, seconds = {}, {}
    with tqdm(total=len(vqa_parts) + len(gen_parts), desc="eval", unit="part", dynamic_ncols=True) as bar:
        for group, parts in (("vqa", vqa_parts), ("geneval", gen_parts)):
            t = time.perf_counter()
            for name, fn in parts.items():
                bar.set_postfix_str(name)
                done[name] = fn()
                bar.update()
            seconds[group] = time.perf_counter() - t
    psnr, vqa, runner, gen, chat_gen, ceiling = (done[k] for k in ("psnr", "vqa", "runner", "geneval",
                                                                     "chat_drawing", "ceiling"))
    diagnostics = {k: done[k] for k in ("paraphrase", "wrong_image", "train_scenes")}
    # the grid: the first generation of one prompt per tag, then more single/two-object prompts
    picked = []
    for tag in W.GENEVAL_TAGS:
        picked += [i for i, r in enumerate(gen["results"]) if r["tag"] == tag][:4]
    grid = make_grid(gen["images"][picked], ncols=4)
    grid.resize((grid.width * 3, grid.height * 3), 0).save(out / "generations.png")  # nearest-neighbour x3
    results = {"psnr": psnr, "vqa": {k: v for k, v in vqa.items() if k != "scores"},
               "vqa_diagnostics": {k: {"accuracy": v["accuracy"], "per_type": v["per_type"]}
                                   for k, v in diagnostics.items()},
               "vqa_runner": runner["scores"], "geneval": gen["summary"], "geneval_chat": chat_gen, "geneval_reconstructions": ceiling, "grid_prompts": [gen["results"][i]["prompt"] for i in picked],
               "seconds": seconds}
    (out / "results.json").write_text(json.dumps(results, indent=1))


def evaluate_chat_drawing(model, processor, unitok, prompts: list[dict], seed: int) -> dict:
    """GenEval rules on pictures asked for in chat ("Draw a red circle."): the reply must be a picture (boi), which
    is then scored like a text-to-image sample; a reply in words scores 0."""
    from shapes.geneval import score_image, summarize
    from mllm.generation import ImageSampling, TextSampling, reply
    from tokenizer.image import to_pil

    results, drew = [], 0
    for k, meta in enumerate(prompts):
        answer = reply(model, processor, [{"role": "user", "content": draw_request(meta["prompt"])}],
                       sampling=TextSampling(max_new_tokens=8), seed=seed + 1000 * k,
                       image_sampling=ImageSampling(cfg_scale=3.0, temperature=1.0))
        if answer.image_codes is None:
            results.append({"tag": meta["tag"], "prompt": meta["prompt"], "metadata": json.dumps(meta),
                             "correct": False, "reason": f"answered in words: {answer.text!r}"})
            continue
        drew += 1
        with torch.no_grad():
            img = to_pil(unitok.decode(answer.image_codes[None].to(next(unitok.parameters()).device))[0].cpu())
        results.append({"prompt_index": k, **score_image(img, meta)})
    summary = summarize(results)
    summary["drew_a_picture"] = drew / max(1, len(prompts))
    return summary


# ================================================================================================ driver
def run_demo(cache: Path, size: DemoSize, seed: int = 0, threads: int | None = None,
             tokenizer: str | None = None, tokenizer_overrides: list[str] = (), curves: bool = False) -> dict:
    from train.common.precision import resolve_precision
    from train.tokenizer.config import TokenizerTrainConfig

    if threads:
        torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    base = {"seed": seed}  # each stage's key: only what changes its output (and the keys of its inputs)
    mllm = {"batch_size": size.batch_size, "max_tokens": size.max_tokens}
    tok_config = configs.path("tokenizer", "demo.yaml")
    tok_precision, why = resolve_precision(
        TokenizerTrainConfig.load(tok_config, list(tokenizer_overrides)).train.mixed_precision)
    stages: dict[str, Stage] = {}
    if tokenizer is None:
        variant = {"overrides": list(tokenizer_overrides)} if tokenizer_overrides else {}
        # the precision `auto` picked is part of the key: bf16 and fp32 tokenizers differ
        tok = stages["tokenizer"] = Stage(cache, "tokenizer", {**base, "steps": size.tokenizer_steps, **variant,
                                                               "config": _digest(tok_config),
                                                               "precision": tok_precision})
        tok_dir, tok_key = tok.dir / "model", tok.key
    else:  # a given tokenizer (e.g. trained by an earlier demo): its weights identify it
        tok_dir = Path(tokenizer)
        tok_key = _digest(tok_dir / "model.safetensors")
    template = chat_template_name()
    data = stages["data"] = Stage(cache, "data", {
        **base, "tokenizer": tok_key, "scenes": size.train_scenes, "prompt_scenes": size.prompt_scenes,
        "chat_template": template, "builder": _source_digest(build_data, vqa_record, texts_for_tokenizer),
        "world": _digest(Path(shapes.world.__file__))})
    # --curves: the MLLM runs export snapshots, which leave their training unchanged (tested) but must exist, so
    # they are part of the stages' keys
    pre_snapshots = snapshot_override(size.pretrain_steps) if curves else []
    pre = stages["pretrain"] = Stage(cache, "pretrain", {
        **base, **mllm, "data": data.key, "steps": size.pretrain_steps,
        "recipe": _digest(configs.path("recipes", "demo-pretrain.yaml")),
        **({"snapshots": pre_snapshots} if pre_snapshots else {})})
    phases = instruct_phases(size)
    if curves:
        phases = [(recipe, steps, overrides + snapshot_override(steps)) for recipe, steps, overrides in phases]
    ins = stages["instruct"] = Stage(cache, "instruct", {
        **base, **mllm, "pretrain": pre.key,
        "phases": [(steps, _digest(configs.path("recipes", recipe)), overrides) for recipe, steps, overrides in phases]})
    ev = stages["eval"] = Stage(cache, "eval", {**base, "instruct": ins.key, "test_scenes": size.test_scenes,
                                                "prompts_per_tag": size.prompts_per_tag})
    if curves:
        cur = stages["curves"] = Stage(cache, "curves", {**base, "instruct": ins.key, "test_scenes": size.test_scenes})
    machine = announce_machine(size, tok_precision, why, [k for k, st in stages.items() if st.cached() is None])

    times: dict[str, tuple[float, bool]] = {}
    if tokenizer is None:
        times["tokenizer"] = tok.run(lambda d: train_tokenizer(d, size, seed, list(tokenizer_overrides)))
    times["data"] = data.run(lambda d: build_data(d, tok_dir, size, seed, template))
    times["pretrain"] = pre.run(lambda d: train_mllm(d, "demo-pretrain.yaml", data.dir, tok_dir,
                                                     size.pretrain_steps, size, seed, None, pre_snapshots))
    times["instruct"] = ins.run(lambda d: instruct(d, phases, data.dir, tok_dir, size, seed, pre.dir / "model"))
    times["eval"] = ev.run(lambda d: evaluate(d, ins.dir / "model", tok_dir, size, seed))
    results = json.loads((ev.dir / "results.json").read_text())
    if curves:
        runs = [("pretrain", size.pretrain_steps, pre.dir, pre.dir / "model")]
        for k, (recipe, steps, _) in enumerate(phases):
            run = phase_dir(ins.dir, k, recipe)
            runs.append((run.name, steps, run, run / "model" if k < len(phases) - 1 else ins.dir / "model"))
        times["curves"] = cur.run(lambda d: learning_curves(d, runs, tok_dir, size, seed))
        results["curves"] = json.loads((cur.dir / "curves.json").read_text())
    results["machine"] = machine
    results["stages"] = {k: {"seconds": s, "cached": c} for k, (s, c) in times.items()}
    results["paths"] = {"tokenizer": str(tok_dir), "model": str(ins.dir / "model"),
                        "grid": str(ev.dir / "generations.png")}
    (cache / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _digest(path: Path) -> str:
    """What a file says, not how: YAML by its parsed content and Python by its syntax tree, so that editing a comment
    does not retrain a stage (a re-wrapped comment in the tokenizer config cost an 8-minute tokenizer run)."""
    text = path.read_bytes()
    if path.suffix in (".yaml", ".yml"):
        text = json.dumps(yaml.safe_load(text), sort_keys=True, default=str).encode()
    elif path.suffix == ".py":
        text = ast.dump(ast.parse(text)).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _source_digest(*fns) -> str:
    """Changes when the code of ``fns`` changes (not when the helpers they call change); by syntax tree, as
    :func:`_digest`, so a comment edit in a stage's builder does not retrain it and every stage after it."""
    trees = "".join(ast.dump(ast.parse(textwrap.dedent(inspect.getsource(fn)))) for fn in fns)
    return hashlib.sha256(trees.encode()).hexdigest()[:16]


def show_examples(results: dict, n: int = 6) -> str:
    ex = results["vqa"].get("examples", [])
    lines = ["Answers on test images (question -> model | truth):"]
    for e in ex[:: max(1, len(ex) // n)][:n]:
        lines.append(f"  {e['question']:<48} -> {e['prediction']!r:<10} | {e['answer']}")
    return "\n".join(lines)


def format_diagnostics(results: dict) -> str:
    """VQA per type: test (canonical wording) beside held-out paraphrases, another scene's image, training scenes."""
    diag = results.get("vqa_diagnostics")
    if not diag:
        return ""
    cols = [("test", results["vqa"])] + [(k, diag[k]) for k in ("paraphrase", "wrong_image", "train_scenes")]
    lines = ["VQA diagnostics (%)      " + "".join(f"{name:>13}" for name, _ in cols)]
    for t in sorted(results["vqa"]["per_type"]):
        lines.append(f"    {t:<20} " + "".join(f"{100 * r['per_type'].get(t, float('nan')):13.1f}" for _, r in cols))
    lines.append(f"    {'all':<20} " + "".join(f"{100 * r['accuracy']:13.1f}" for _, r in cols))
    return "\n".join(lines)


def format_chat_drawing(results: dict) -> list[str]:
    chat = results.get("geneval_chat")
    if not chat:
        return []
    tags = "  ".join(f"{t} {v:.2f}" for t, v in chat["per_task"].items())
    lines = [f"GenEval-style, asked in chat ('Draw ...'): overall {chat['overall']:.3f}, a picture in "
             f"{100 * chat['drew_a_picture']:.0f} % of replies", f"    {tags}"]
    ceiling = results.get("geneval_reconstructions")
    if ceiling:
        lines.append(f"GenEval-style of the tokenizer's reconstructions of exact scenes (the generator's ceiling): "
                     f"{ceiling['overall']:.3f}")
    return lines + [""]


def format_stage_times(stages: dict) -> str:
    """One line of per-stage seconds; a stage taken from the cache is starred, and the legend shows only then."""
    line = "stage times (s):  " + "  ".join(f"{k} {v['seconds']:.0f}{'*' if v['cached'] else ''}"
                                         for k, v in stages.items())
    return line + ("   (* cached from an earlier run)" if any(v["cached"] for v in stages.values()) else "")


def format_machine(machine: dict, stages: dict) -> str:
    ran = {k: v["seconds"] for k, v in stages.items() if not v["cached"]}
    est = sum(machine["estimate_seconds"].get(k, 0) for k in ran)
    return (f"machine: {machine['cpu']}, torch {machine['capability']}, {machine['threads']} threads, fp32 "
            f"{machine['fp32_gflops']:.0f} / bf16 {machine['bf16_gflops']:.1f} GFLOP/s, tokenizer in "
            f"{'bf16' if machine['tokenizer_precision'] == 'bf16' else 'fp32'}; the stages run took "
            f"{minutes(sum(ran.values()))} against {minutes(est)} estimated (within {minutes(BOUND_FACTOR * est)})")


def format_table(results: dict) -> str:
    from eval.shapes.evaluate import format_scores

    runner = results.get("vqa_runner")
    lines = [show_examples(results), "", format_scores(results["psnr"], results["vqa"], results["geneval"]),
             *([f"VQA through `unitok eval vqa` (VQAv2 layout, official scorer): {runner['overall']:.2f} %; "
                f"GenEval-style above: `unitok eval geneval` + `geneval-score --detector shapes`"] if runner else []),
             "",
             format_diagnostics(results), "",
             *([format_curves(results["curves"]), ""] if results.get("curves") else []),
             *format_chat_drawing(results),
             format_stage_times(results["stages"]),
             *([format_machine(results["machine"], results["stages"])] if results.get("machine") else []),
             f"total {sum(v['seconds'] for v in results['stages'].values()) / 60:.1f} min of compute;  "
             f"grid of generations: {results['paths']['grid']}",
             f"chat with it:  unitok chat --model {results['paths']['model']} --tokenizer "
             f"{results['paths']['tokenizer']}"]
    return "\n".join(lines)


def run_ablation(cache: Path, size: DemoSize, seed: int = 0, threads: int | None = None) -> dict:
    """Reconstruction-only (the default) against reconstruction + contrastive tokenizers, each followed by the same
    MLLM stages; the default's stages live in ``cache``, the contrastive ones in ``cache/contrastive``."""
    from demo.probe import probe
    from mllm.cli import load_mllm, load_unitok

    rows = {}
    for name, where, overrides in (("reconstruction", cache, []),
                                   ("reconstruction + contrastive", cache / "contrastive", CONTRASTIVE)):
        results = run_demo(where, size, seed, threads, tokenizer_overrides=overrides)
        model, _ = load_mllm(results["paths"]["model"], device="cpu")
        unitok = load_unitok(results["paths"]["tokenizer"], model, model.device)
        n_train, n_test = (1000, 400) if size.test_scenes >= 100 else (20, 10)
        rows[name] = {"psnr": results["psnr"], "probe": probe(model, unitok, n_train, n_test, seed),
                      "vqa": results["vqa"]["accuracy"], "vqa_per_type": results["vqa"]["per_type"],
                      "geneval": results["geneval"]["overall"], "geneval_per_task": results["geneval"]["per_task"],
                      "minutes": sum(v["seconds"] for v in results["stages"].values()) / 60}
    (cache / "ablation.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_ablation(rows: dict) -> str:
    lines = ["| tokenizer | PSNR (dB) | probe of the codes: colour / shape / size / cell (%) | VQA | GenEval-style |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        c = r["probe"]["codes"]
        lines.append(f"| {name} | {r['psnr']:.2f} | {100 * c['color']:.1f} / {100 * c['shape']:.1f} / "
                     f"{100 * c['size']:.1f} / {100 * c['cell']:.1f} | {100 * r['vqa']:.1f} % | {r['geneval']:.3f} |")
    return "\n".join(lines)


STEP_FIELDS = ("tokenizer_steps", "pretrain_steps", "instruct_steps", "selection_steps", "consolidate_steps",
               "train_scenes", "test_scenes", "prompts_per_tag")  # DemoSize fields the command line can override


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default="runs/demo", help="stages are cached here and reused by later runs")
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="smoke: seconds (tests); small: a few minutes; full: the README table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--tokenizer", default=None, help="use this trained 64-px UniTok instead of training one")
    p.add_argument("--ablation", action="store_true",
                   help="the paper's ablation: reconstruction-only vs reconstruction + contrastive tokenizers, each "
                        "followed by the same MLLM stages (the second under CACHE_DIR/contrastive)")
    p.add_argument("--curves", action="store_true",
                   help="per-type VQA learning curves: the MLLM stages export snapshots (retrained if cached "
                        "without), each scored on the test and training scenes (CACHE_DIR/curves/curves.json)")
    for field in STEP_FIELDS:
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"override the size's {field}")


def run(args: argparse.Namespace) -> int:
    from train.common.cli import setup_logging

    setup_logging()
    size = SIZES[args.size]
    changes = {k: getattr(args, k) for k in STEP_FIELDS if getattr(args, k) is not None}
    size = replace(size, **changes)
    t = time.perf_counter()
    if args.ablation:
        if args.tokenizer or args.curves:
            raise ValueError("--ablation trains both tokenizers and scores their final models; it does not take "
                             "--tokenizer or --curves")
        print(format_ablation(run_ablation(Path(args.cache_dir), size, args.seed, args.threads)))
        print(f"(this run: {time.perf_counter() - t:.0f} s wall)")
        return 0
    results = run_demo(Path(args.cache_dir), size, args.seed, args.threads, args.tokenizer, curves=args.curves)
    print()
    print(format_table(results))
    print(f"(this run: {time.perf_counter() - t:.0f} s wall)")
    return 0
