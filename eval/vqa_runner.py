"""``unitok eval vqa``: answer a benchmark's questions with a checkpoint, the LLaVA-1.5 / UniTok way, then score them
with the official rules (``eval/scorers.py``) or write the files the official servers take.

    unitok eval vqa --benchmark pope --model DIR --tokenizer PATH --data playground/data/eval/pope --out runs/pope
    accelerate launch -m unitok_cli eval vqa --benchmark gqa ...     # data-parallel: contiguous shards, merged

Inputs are the files researchers already have: LLaVA's ``playground/data/eval/<bench>/`` (its question JSONL,
``{question_id, image, text, category}``, with the prompt suffix already in ``text``; the image folder) and the
official annotation files. The protocol (eval_spec §1): the model's chat template around ``<image>\\n{text}``, greedy
decoding, ``max_new_tokens`` 128 (LLaVA's ``model_vqa_loader``), the reply ``strip()``-ed; images padded to a square
with LLaVA's grey and resized to the tokenizer's side. Questions are decoded in left-padded batches; a batched answer
equals the one-at-a-time answer (tested).

Outputs under ``--out``: ``answers/rank-*.jsonl`` written as answers are produced (a rerun skips answered question
ids), ``answers/merge.jsonl`` in question-file order (LLaVA's answer format), ``results.json`` and ``results.md``,
and per benchmark: POPE's and TextVQA's scores; GQA's ``testdev_balanced_predictions.json`` (scored when the
official questions file is there); VQAv2's EvalAI upload ``answers_upload/vqav2_test-dev.json`` (every test2015
question, "" where unanswered, answers through the EvalAI processor), scored locally when ``--annotations`` gives
val annotations; MME's ``mme/<task>.txt`` for ``calculation.py`` (ground truth from the benchmark folder), scored.
A missing or unreadable image is counted, answered with "" and named in ``results.json``; it never stops the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .scorers import read_jsonl


@dataclass(frozen=True)
class Layout:
    """Where LLaVA's eval.zip puts a benchmark's files (relative to ``playground/data/eval/<bench>``)."""

    questions: str
    images: str
    max_new_tokens: int = 128  # LLaVA-1.5's scripts run model_vqa_loader with its default


LAYOUTS = {
    "vqav2": Layout("llava_vqav2_mscoco_test-dev2015.jsonl", "test2015"),
    "gqa": Layout("llava_gqa_testdev_balanced.jsonl", "data/images"),
    "textvqa": Layout("llava_textvqa_val_v051_ocr.jsonl", "train_images"),
    "pope": Layout("llava_pope_test.jsonl", "val2014"),
    "mme": Layout("llava_mme.jsonl", "MME_Benchmark_release_version"),
}
SHORT_ANSWER = "Answer the question using a single word or phrase."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", dest="task", required=True, choices=sorted(LAYOUTS))  # (eval's own dest is benchmark)
    p.add_argument("--model", required=True, help="MLLM folder")
    p.add_argument("--tokenizer", required=True, help="UniTok tokenizer (folder or official .pth)")
    p.add_argument("--data", required=True, help="the benchmark's folder (LLaVA: playground/data/eval/<bench>)")
    p.add_argument("--out", required=True, help="answers, results.json, results.md and submission files go here")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--question-file", default=None, help="instead of the layout's (e.g. a val split)")
    p.add_argument("--image-folder", default=None, help="instead of the layout's")
    p.add_argument("--annotations", default=None,
                   help="official annotations: VQAv2 val JSON, GQA questions JSON, TextVQA JSON, POPE folder "
                        "(default: the layout's file when present)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the answers of another run in --out")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


RUN_OUTPUTS = ("run.json", "answers", "results.json", "results.md", "testdev_balanced_predictions.json",
               "answers_upload", "mme")


def claim_run(out: Path, run: dict, overwrite: bool, writer: bool, outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """A rerun of the same run (``run.json`` equal to ``run``) resumes; the outputs (glob patterns) of another run
    (another model, tokenizer, benchmark, question file, decoding length, sampling) in ``out`` are never mixed in:
    that is an error, or with ``--overwrite`` they are deleted first."""
    from tokenizer.checkpoint import claim_output

    marker = out / "run.json"
    if marker.is_file() and json.loads(marker.read_text()) == run:
        return
    if marker.is_file() and not overwrite:
        theirs = json.loads(marker.read_text())
        differ = ", ".join(f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in run.items() if theirs.get(k) != v)
        raise FileExistsError(f"{out} holds the outputs of another run: {differ}; pass --overwrite to replace them, "
                              f"or choose another --out")
    claim_output(out, overwrite, outputs, remove=writer)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1) + "\n")
        tmp.replace(marker)  # other ranks read it: never half-written


# ---------------------------------------------------------------------------- files
def claim_run_on_every_rank(out: Path, run: dict, overwrite: bool, state) -> None:
    """``claim_run`` under data parallelism: every process checks before the main process changes anything, so a
    slower process never takes this run's fresh run.json for another run's outputs (it did, exit 2 on rank 1)."""
    claim_run(out, run, overwrite, writer=False)
    state.wait_for_everyone()
    if state.is_main_process:
        claim_run(out, run, overwrite, writer=True)
    state.wait_for_everyone()


def question_key(question_id, prompt: str) -> tuple:
    """What identifies a question: MME gives both questions of an image the same question_id (the image)."""
    return str(question_id), prompt


def answered(answer_dir: Path) -> dict:
    """question key -> answer line, from every shard file; a line cut short by a crash is ignored (it is redone)."""
    done = {}
    for path in sorted(answer_dir.glob("rank-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            try:
                row = json.loads(line)
                done[question_key(row["question_id"], row["prompt"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def shard(items: list, rank: int, world: int) -> list:
    """LLaVA's ``get_chunk``: contiguous chunks of ceil(n / world)."""
    size = math.ceil(len(items) / world) if items else 0
    return items[rank * size:(rank + 1) * size]


# ---------------------------------------------------------------------------- answering
def answer_batch(model, processor, unitok, questions: list[dict], image_folder: Path, max_new_tokens: int
                 ) -> list[tuple[str, dict]]:
    """(answer text, metadata) per question. A question whose image cannot be read (``image_error``) or whose prompt
    leaves no room for ``max_new_tokens`` in the model's context (``prompt_error``) is answered "" and the reason
    recorded, so one bad record never stops a run."""
    from mllm.generation import TextSampling, generate_replies
    from tokenizer.image import load_image, preprocess_padded

    context = model.config.max_position_embeddings
    pixels, rows, problems = [], [], []
    for q in questions:
        try:
            row = processor.chat_prompt([{"role": "user", "content": "<image>\n" + q["text"]}])
        except ValueError as err:  # longer than the processor's max_length
            problems.append({"prompt_error": str(err)})
            continue
        if len(row) + max_new_tokens > context:
            problems.append({"prompt_error": f"prompt of {len(row)} tokens + {max_new_tokens} new tokens exceeds the "
                                             f"model's context of {context}"})
            continue
        try:
            pixels.append(preprocess_padded(load_image(image_folder / q["image"]), unitok.config.image_size))
        except (FileNotFoundError, ValueError) as err:
            problems.append({"image_error": str(err)})
            continue
        problems.append({})
        rows.append(row)
    texts = iter([])
    if rows:
        with torch.inference_mode():
            codes = unitok.encode(torch.stack(pixels).to(model.device))
        texts = iter(generate_replies(model, processor, rows, codes, TextSampling(max_new_tokens=max_new_tokens)))
    return [("", p) if p else (next(texts), {}) for p in problems]


# ---------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from tqdm import tqdm

    from mllm.cli import load_mllm, load_unitok

    layout = LAYOUTS[args.task]
    data = Path(args.data)
    question_file = Path(args.question_file) if args.question_file else data / layout.questions
    image_folder = Path(args.image_folder) if args.image_folder else data / layout.images
    questions = read_jsonl(question_file, f"{args.task} question file")
    for n, q in enumerate(questions, 1):
        missing = [k for k in ("question_id", "image", "text") if k not in q]
        if missing:
            raise ValueError(f"{question_file} record {n}: no {', '.join(missing)} (LLaVA question files have "
                             f"question_id, image, text)")
    partial = args.limit is not None and args.limit < len(questions)
    if partial:
        questions = questions[:args.limit]
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    # processes without a GPU shard over gloo (PartialState's cpu flag; accelerate launch --cpu sets the variable)
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    out, state = Path(args.out), PartialState(cpu=cpu)
    run_id = {"benchmark": args.task, "model": str(Path(args.model).resolve()),
              "tokenizer": str(Path(args.tokenizer).resolve()), "question_file": str(question_file.resolve()),
              "max_new_tokens": args.max_new_tokens or layout.max_new_tokens}
    claim_run_on_every_rank(out, run_id, args.overwrite, state)
    answer_dir = out / "answers"
    answer_dir.mkdir(parents=True, exist_ok=True)
    done = answered(answer_dir)
    todo = shard([q for q in questions if question_key(q["question_id"], q["text"]) not in done],
                 state.process_index, state.num_processes)
    state.wait_for_everyone()  # every rank shards the same snapshot of what is answered, before anyone writes

    # each process on its own device (accelerate's cuda:<local rank>), unless --device says otherwise
    model, processor = load_mllm(args.model, args.device or str(state.device), args.dtype)
    unitok = load_unitok(args.tokenizer, model, model.device)
    model_id = Path(args.model).resolve().name
    max_new = run_id["max_new_tokens"]
    shard_file = answer_dir / f"rank-{state.process_index:05d}.jsonl"
    if shard_file.is_file() and shard_file.stat().st_size and not shard_file.read_bytes().endswith(b"\n"):
        with open(shard_file, "a", encoding="utf-8") as f:  # end a line a crash cut short (it is ignored)
            f.write("\n")
    with open(shard_file, "a", encoding="utf-8") as sink, \
            tqdm(total=len(todo), desc=f"{args.task} (rank {state.process_index})", unit="q",
                 disable=not todo) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            for q, (text, problem) in zip(batch, answer_batch(model, processor, unitok, batch, image_folder,
                                                              max_new)):
                row = {"question_id": q["question_id"], "prompt": q["text"], "text": text,
                       "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": problem}
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(batch))
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    results = finish(args.task, questions, answered(answer_dir), out, data, args.annotations, len(todo), partial)
    print(format_results(args.task, results))
    return 0


# ---------------------------------------------------------------------------- merge, submission files, scores
def finish(benchmark: str, questions: list[dict], done: dict, out: Path, data: Path, annotations: str | None,
           generated: int, partial: bool = False) -> dict:
    """Merge the shards in question order, write the benchmark's files, score what can be scored (``partial``: the
    questions are the first ``--limit`` of the file)."""
    keys = [question_key(q["question_id"], q["text"]) for q in questions]
    merged = [done[k] for k in keys if k in done]
    with open(out / "answers" / "merge.jsonl", "w", encoding="utf-8") as f:
        for row in merged:
            f.write(json.dumps(row) + "\n")
    bad = {kind: [{"question_id": r["question_id"], "error": r["metadata"][kind]} for r in merged
                  if r.get("metadata", {}).get(kind)] for kind in ("image_error", "prompt_error")}
    results = {"benchmark": benchmark, "questions": len(questions), "answered": len(merged),
               "generated_this_run": generated, "image_errors": len(bad["image_error"]),
               "image_error_examples": bad["image_error"][:10], "prompt_errors": len(bad["prompt_error"]),
               "prompt_error_examples": bad["prompt_error"][:10]}
    results["scores"], results["files"] = (BENCHMARK_FINISH[benchmark](merged, questions, out, data, annotations,
                                                                        partial) if merged else (None, {}))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(format_results(benchmark, results) + "\n")
    return results


def _annotation(annotations: str | None, default: Path) -> Path | None:
    path = Path(annotations) if annotations else default
    if annotations and not path.exists():
        raise FileNotFoundError(f"no annotations at {path}")
    return path if path.exists() else None


def _pope(merged, questions, out, data, annotations, partial):
    from .scorers import score_pope

    labels = _annotation(annotations, data / "coco")
    if labels is None:
        return None, {}
    # a --limit run answers the first questions of the file: they pair with the first labels of their categories
    return score_pope(merged, questions, labels, first_only=partial), {}


def _gqa(merged, questions, out, data, annotations, partial):
    from .scorers import score_gqa

    predictions = [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in merged]
    path = out / "testdev_balanced_predictions.json"
    path.write_text(json.dumps(predictions))
    official = _annotation(annotations, data / "data" / "testdev_balanced_questions.json")
    if official is None:
        return None, {"predictions": str(path)}
    gqa_questions = json.loads(official.read_text())
    answered_ids = {str(r["question_id"]) for r in merged}
    gqa_questions = {k: v for k, v in gqa_questions.items() if k in answered_ids}  # --limit scores what it answered
    return score_gqa(predictions, gqa_questions), {"predictions": str(path)}


def _textvqa(merged, questions, out, data, annotations, partial):
    from .scorers import score_textvqa

    official = _annotation(annotations, data / "TextVQA_0.5.1_val.json")
    if official is None:
        return None, {}
    return score_textvqa(merged, json.loads(official.read_text())["data"]), {}


def _vqav2(merged, questions, out, data, annotations, partial):
    from .vqa_metric import EvalAIAnswerProcessor, evaluate_vqa

    files = {}
    test_split = data / "llava_vqav2_mscoco_test2015.jsonl"
    if test_split.is_file():  # LLaVA's convert_vqav2_for_submission.py: every test2015 question, "" if unanswered
        process = EvalAIAnswerProcessor()
        text_of = {r["question_id"]: r["text"] for r in merged}
        upload = [{"question_id": q["question_id"], "answer": process(text_of[q["question_id"]])
                   if q["question_id"] in text_of else ""} for q in read_jsonl(test_split, "VQAv2 test2015 list")]
        path = out / "answers_upload" / "vqav2_test-dev.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(upload))
        files["evalai_upload"] = str(path)
    if not annotations:
        return None, files
    ann = json.loads(Path(annotations).read_text())
    ann = ann["annotations"] if isinstance(ann, dict) else ann
    ids = {r["question_id"] for r in merged}
    res = evaluate_vqa([a for a in ann if a["question_id"] in ids],
                       [{"question_id": r["question_id"], "answer": r["text"]} for r in merged], "llava")
    return {k: v for k, v in res.items() if k not in ("acc", "evalQA")}, files


def mme_ground_truth(root: Path) -> dict:
    """(task, <image>.txt, question) -> answer, from the MME release's question files (LLaVA's
    ``convert_answer_to_mme.py``): ``<task>/questions_answers_YN/*.txt`` or ``<task>/*.txt``, lines
    ``question<TAB>answer``."""
    truth = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").is_dir() else task_dir
        for path in sorted(qa_dir.glob("*.txt")):
            for line in open(path, encoding="utf-8"):
                if line.strip():
                    question, answer = line.strip().split("\t")
                    truth[(task_dir.name, path.name, question)] = answer
    return truth


def _mme(merged, questions, out, data, annotations, partial):
    from .scorers import score_mme

    root = _annotation(annotations, data / LAYOUTS["mme"].images)
    if root is None:
        return None, {}
    truth = mme_ground_truth(root)
    per_task: dict[str, list[str]] = {}
    for r in merged:
        task = r["question_id"].split("/")[0]
        name = r["question_id"].split("/")[-1].split(".")[0] + ".txt"
        prompt = r["prompt"].replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in r["prompt"] else r["prompt"]
        if "Please answer yes or no." not in prompt:
            prompt += " Please answer yes or no."
            if (task, name, prompt) not in truth:  # some ground-truth files have two spaces before it
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if (task, name, prompt) not in truth:
            raise ValueError(f"MME: no ground truth for {r['question_id']} {prompt!r} under {root}")
        per_task.setdefault(task, []).append("\t".join((name, prompt, truth[(task, name, prompt)], r["text"])) + "\n")
    mme_dir = out / "mme"
    mme_dir.mkdir(parents=True, exist_ok=True)
    for task, lines in per_task.items():
        (mme_dir / f"{task}.txt").write_text("".join(lines))
    return score_mme(mme_dir), {"mme_answers": str(mme_dir)}


BENCHMARK_FINISH = {"pope": _pope, "gqa": _gqa, "textvqa": _textvqa, "vqav2": _vqav2, "mme": _mme}


def format_results(benchmark: str, results: dict) -> str:
    s = results["scores"]
    lines = [f"| {benchmark} | figure |", "|---|---|",
             f"| questions answered | {results['answered']} of {results['questions']} "
             f"({results['generated_this_run']} this run) |",
             f"| images missing or unreadable | {results['image_errors']} |",
             f"| prompts too long for the context | {results['prompt_errors']} |"]
    if s is None:
        lines.append("| score | no annotations here (see files) |")
    elif benchmark == "pope":
        for cat, v in s["per_category"].items():
            lines.append(f"| {cat} F1 / acc / yes-ratio | {100 * v['f1']:.1f} / {100 * v['accuracy']:.1f} / "
                         f"{100 * v['yes_ratio']:.1f} |")
        lines.append(f"| **POPE mean F1** | **{s['f1']:.1f}** (mean accuracy {s['accuracy']:.1f}) |")
    elif benchmark == "mme":
        lines.append(f"| **MME perception** | **{s['perception']:.1f}** (cognition {s['cognition']:.1f}) |")
    elif benchmark == "gqa":
        lines.append(f"| **GQA accuracy** | **{s['all']:.2f}** (binary {s['binary']:.2f}, open {s['open']:.2f}) |")
    else:
        lines.append(f"| **{benchmark} accuracy** | **{s['overall']:.2f}** |")
    for name, path in results["files"].items():
        lines.append(f"| {name} | `{path}` |")
    return "\n".join(lines)
