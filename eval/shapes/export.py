"""The shapes world's test scenes in the official benchmarks' file layouts, so that ``unitok eval vqa`` and the
scorers run end to end on real files (``unitok eval shapes-export --out DIR``):

* ``pope/``: the existence questions (one yes, one near-miss no per scene) as LLaVA's ``llava_pope_test.jsonl``
  (category ``random``) and POPE's ``coco/coco_pope_random.json`` labels;
* ``gqa/``: the other questions as ``llava_gqa_testdev_balanced.jsonl`` and the official
  ``data/testdev_balanced_questions.json`` (yes/no answers are structural ``verify``, the rest ``query``);
* ``vqav2/``: every question as LLaVA's test-dev and test2015 lists, and val-style official annotations (the one
  answer ten times, answer types yes/no, number, other);
* ``mme/``: ``existence`` and ``position`` tasks (a yes and a no question per image, as MME pairs them), with the
  release's ``<task>/<image>.txt`` ground truth;
* ``geneval/evaluation_metadata.jsonl``: the shapes world's GenEval-style prompts (those ``unitok eval shapes``
  draws), in GenEval's metadata format, for ``unitok eval geneval --metadata`` and ``geneval-score --detector
  shapes``.

Prompts are the shapes evaluation's (``question + " Answer the question using a single word or phrase."``), so the
runner asked for ``--max-new-tokens 4`` gives the answers ``unitok eval shapes`` scores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from shapes import world as W
from shapes.suite import VQA_SUFFIX, test_scenes


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _image(path: Path, scene) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    W.render(scene).save(path)


def answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def export(out: Path, scenes: list, prompts: list[dict] = ()) -> dict[str, int]:
    """Write the layouts under ``out``; returns the number of questions (prompts for GenEval) in each."""
    pope, pope_labels, gqa, gqa_official, vqa, vqa_ann, mme = [], [], [], {}, [], [], []
    for i, scene in enumerate(scenes):
        name = f"{i:06d}_{scene.id}.png"
        asked = W.questions(scene)
        for j, q in enumerate(asked):
            qid, text = i * 100 + j, q["question"] + VQA_SUFFIX
            vqa.append({"question_id": qid, "image": name, "text": text, "category": "default"})
            vqa_ann.append({"question_id": qid, "image_id": i, "question_type": q["type"],
                            "answer_type": answer_type(q["answer"]), "multiple_choice_answer": q["answer"],
                            "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
            if q["type"] == "exists":
                pope.append({"question_id": qid, "image": name, "text": text, "category": "random"})
                pope_labels.append({"question_id": qid, "image": name, "text": q["question"], "label": q["answer"]})
            else:
                gqa.append({"question_id": str(qid), "image": name, "text": text})
                gqa_official[str(qid)] = {"question": q["question"], "answer": q["answer"], "isBalanced": True,
                                          "imageId": name[:-4], "types": {
                                              "structural": "verify" if q["answer"] in ("yes", "no") else "query"}}
        for task, qtype in (("existence", "exists"), ("position", "position")):
            pair = sorted((q for q in asked if q["type"] == qtype), key=lambda q: q["answer"] != "yes")
            if [q["answer"] for q in pair] != ["yes", "no"]:
                continue  # MME asks one yes and one no question per image
            root = out / "mme" / "MME_Benchmark_release_version" / task
            _image(root / name, scene)
            (root / f"{name[:-4]}.txt").write_text("".join(
                f"{q['question']} Please answer yes or no.\t{q['answer'].capitalize()}\n" for q in pair))
            mme += [{"question_id": f"{task}/{name}", "image": f"{task}/{name}", "text": q["question"] + VQA_SUFFIX,
                     "category": task} for q in pair]
        for folder in ("pope/val2014", "gqa/data/images", "vqav2/test2015"):
            _image(out / folder / name, scene)
    _jsonl(out / "pope" / "llava_pope_test.jsonl", pope)
    _jsonl(out / "pope" / "coco" / "coco_pope_random.json", pope_labels)
    _jsonl(out / "gqa" / "llava_gqa_testdev_balanced.jsonl", gqa)
    (out / "gqa" / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gqa_official))
    _jsonl(out / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl", vqa)
    _jsonl(out / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl", vqa)
    (out / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": vqa_ann}))
    _jsonl(out / "mme" / "llava_mme.jsonl", mme)
    _jsonl(out / "geneval" / "evaluation_metadata.jsonl", prompts)
    return {"pope": len(pope), "gqa": len(gqa), "vqav2": len(vqa), "mme": len(mme), "geneval": len(prompts)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for pope/, gqa/, vqav2/, mme/, geneval/")
    p.add_argument("--scenes", type=int, default=200, help="test scenes (those `unitok eval shapes` scores)")
    p.add_argument("--seed", type=int, default=0, help="as `unitok demo --seed`")
    p.add_argument("--prompts-per-tag", type=int, default=20, help="GenEval-style prompts per tag (as `eval shapes`)")


def run(args: argparse.Namespace) -> int:
    counts = export(Path(args.out), test_scenes(args.scenes, args.seed), W.geneval_prompts(args.prompts_per_tag))
    print(", ".join(f"{k}: {n} {'prompts' if k == 'geneval' else 'questions'}" for k, n in counts.items())
          + f" -> {args.out}/")
    print(f"e.g. unitok eval vqa --benchmark pope --data {args.out}/pope --max-new-tokens 4 --model M --tokenizer T "
          f"--out runs/eval/pope\n     unitok eval geneval --metadata {args.out}/geneval/evaluation_metadata.jsonl "
          f"--cfg 3 --images-per-prompt 1 --model M --tokenizer T --out runs/eval/geneval\n"
          f"     unitok eval geneval-score runs/eval/geneval --detector shapes")
    return 0
