"""``unitok eval score {pope,mme,gqa,vqav2,textvqa,geneval} ...``: the official scoring rules on the official files,
so that the same answers give the numbers the LLaVA / UniTok papers print (``../shared/notes/eval_spec.md``).

* POPE (``llava/eval/eval_pope.py``): per category, answers in result-file order paired by position with the labels
  of ``coco_pope_<category>.json`` in file order; an answer is "no" when its first sentence holds the word ``No``,
  ``no`` or ``not`` (case-sensitive, split on spaces). Reported: the mean F1 over the categories.
* MME (``eval_tool/calculation.py``): per ``<task>.txt`` of ``image\\tquestion\\tgt\\tprediction`` lines, consecutive
  pairs per image; ``pred[:4]`` parse; task score = 100·acc + 100·acc+; perception and cognition totals.
* GQA (testdev-balanced, the ``eval.py`` LLaVA uses): exact string match after ``rstrip('.').lower()`` of the answer.
* VQAv2 / TextVQA: :mod:`eval.vqa_metric` (the official normalisation, unanimity rule and leave-one-out mean).
* GenEval (``summary_scores.py``): per-task mean of ``correct``, overall = the unweighted mean of the six tasks.

``protocol="lmms-eval"`` (``--protocol lmms-eval``) scores the same answers the way lmms-eval >= 0.6's tasks do
(``lmms_eval/tasks/{pope,mme,gqa,vqav2,textvqa}/utils.py`` and the default ``exact_match``; every reply is
``strip()``-ed first, as lmms-eval's ``Task.process_results`` does):

* POPE: ``pred.lower().strip()`` must equal yes/no exactly (``"Yes."`` is neither, so it counts in no cell of
  precision or recall); precision / recall are 0 when undefined; **yes_ratio is the ground truth's**;
* MME: ``.`` deleted, single ``y``/``n`` accepted, then the ``[:4]`` parse; answers paired by image, not line order;
* GQA: exact match after lower-casing and deleting ``string.punctuation`` on both sides (no ``rstrip('.')``);
* VQAv2: punctuation and digit/article steps on both sides always, no unanimity rule, mean of the leave-one-out
  values (``eval.vqa_metric`` ``lmms_eval_0.7``); TextVQA: the m4c rule with ``statistics.mean``.

Figures are reported in percent in both protocols (lmms-eval prints fractions). The prompt differences (lmms-eval's
TextVQA has no OCR tokens) are the runner's, not the scorer's.
"""
from __future__ import annotations

import argparse
import json
import re
import string
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

POPE_CATEGORIES = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
PROTOCOLS = ("llava", "lmms-eval")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


# ------------------------------------------------------------------------------------------------ POPE
def pope_answer(text: str) -> str:
    """``eval_pope.py``'s parse: first sentence, commas deleted, split on spaces; "no" if a word is No/not/no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(answers: Sequence[str], labels: Sequence[str], protocol: str = "llava") -> dict[str, Any]:
    """TP/FP/TN/FN (positive = yes), accuracy, precision, recall, F1 and yes-ratio of one category."""
    _check_protocol(protocol)
    if len(answers) != len(labels):
        raise ValueError(f"POPE pairs answers and labels by position: {len(answers)} answers, {len(labels)} labels "
                         "(LLaVA's 2910-question random split needs the AoiDragon/POPE e3e3926 label file)")
    if protocol == "lmms-eval":
        return _pope_lmms_eval(answers, labels)
    pred = [0 if pope_answer(a) == "no" else 1 for a in answers]
    gold = [0 if lab == "no" else 1 for lab in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    if tp + fp == 0:
        raise ValueError("POPE: no answer parsed as yes, so precision is undefined (the official script divides "
                         "by zero here)")
    precision, recall = tp / (tp + fp), tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / len(pred), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": sum(pred) / len(pred), "n": len(pred)}


def _pope_lmms_eval(answers: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """lmms-eval ``pope_process_results`` + its aggregations."""
    pred = [a.strip().lower().strip() for a in answers]
    gold = [lab.lower().strip() for lab in labels]
    bad = sorted({g for g in gold if g not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE (lmms-eval): labels must be yes or no, got {bad[0]!r}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall else 0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(pred),
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": gold.count("yes") / len(gold), "n": len(pred)}


def score_pope(results: Sequence[Mapping], questions: Sequence[Mapping], annotation_dir: str | Path,
               first_only: bool = False, protocol: str = "llava") -> dict:
    """``results``: answer lines ``{question_id, text}``; ``questions``: LLaVA's question file (``question_id``,
    ``category``); ``annotation_dir``: the ``coco_pope_<category>.json`` label files. ``first_only``: the answers
    cover only the first questions of each category (a ``--limit`` run), paired with as many first labels."""
    category_of = {q["question_id"]: q["category"] for q in questions}
    per: dict[str, Any] = {}
    for cat in sorted({category_of[r["question_id"]] for r in results if r["question_id"] in category_of}):
        labels = [json.loads(line)["label"] for line in open(Path(annotation_dir) / f"coco_pope_{cat}.json")
                  if line.strip()]
        answers = [r["text"] for r in results if category_of.get(r["question_id"]) == cat]
        if first_only:
            labels = labels[:len(answers)]
        per[cat] = pope_scores(answers, labels, protocol)
    if not per:
        raise ValueError("POPE: no result line has a question_id of the question file")
    f1s = [v["f1"] for v in per.values()]
    return {"per_category": per, "f1": 100 * sum(f1s) / len(f1s),
            "accuracy": 100 * sum(v["accuracy"] for v in per.values()) / len(per)}


# ------------------------------------------------------------------------------------------------ MME
def mme_answer(pred: str) -> str:
    """``calculation.py``'s parse of the lower-cased prediction (trailing newline included, as it reads it)."""
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_answer_lmms_eval(pred: str) -> str:
    """lmms-eval's ``parse_pred_ans`` (from Otter): ``.`` deleted, ``y``/``n`` accepted, then the ``[:4]`` parse."""
    pred = pred.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme_task(lines: Sequence[str], name: str = "task", protocol: str = "llava") -> dict[str, float]:
    """One ``<task>.txt``: acc over questions, acc+ over images (both answers right), score = 100·(acc + acc+)."""
    _check_protocol(protocol)
    rows = [line.split("\t") for line in lines if line.strip()]
    if protocol == "lmms-eval":
        return _mme_task_lmms_eval(rows, name)
    if len(rows) % 2:
        raise ValueError(f"MME {name}: {len(rows)} lines; the official script pairs 2 lines per image")
    right = []
    for row in rows:
        if len(row) < 4:
            raise ValueError(f"MME {name}: a line has {len(row)} tab fields, expected image, question, gt, answer")
        gt, pred = row[2].lower(), row[-1].lower()
        right.append(mme_answer(pred) == gt)
    acc = sum(right) / len(right)
    acc_plus = sum(right[i] and right[i + 1] for i in range(0, len(right), 2)) / (len(right) // 2)
    return {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
            "n": len(right)}


def _mme_task_lmms_eval(rows: list[list[str]], name: str) -> dict[str, float]:
    """lmms-eval ``mme_process_results`` + ``mme_aggregate_results`` for one task: answers grouped by image (the
    question_id), exactly 2 per image; score = mean over images of (100·acc + 100·acc+)."""
    by_image: dict[str, list[float]] = {}
    for row in rows:
        if len(row) < 4:
            raise ValueError(f"MME {name}: a line has {len(row)} tab fields, expected image, question, gt, answer")
        gt = row[2].lower().strip().replace(".", "")
        if gt not in ("yes", "no"):
            raise ValueError(f"MME {name}: ground truth {row[2]!r} is not yes or no")
        by_image.setdefault(row[0], []).append(1.0 if mme_answer_lmms_eval(row[-1].strip()) == gt else 0.0)
    odd = [img for img, v in by_image.items() if len(v) != 2]
    if odd:
        raise ValueError(f"MME {name}: image {odd[0]} has {len(by_image[odd[0]])} answers; MME pairs 2 per image")
    acc = [sum(v) / len(v) * 100.0 for v in by_image.values()]
    plus = [(sum(v) == 2) * 100.0 for v in by_image.values()]
    score = 0.0
    for a, p in zip(acc, plus):
        score += p + a
    return {"acc": sum(acc) / len(acc), "acc_plus": sum(plus) / len(plus), "score": score / len(by_image),
            "n": 2 * len(by_image)}


def score_mme(results_dir: str | Path, protocol: str = "llava") -> dict[str, Any]:
    root = Path(results_dir)
    tasks = {p.stem: score_mme_task(p.read_text().splitlines(keepends=True), p.stem, protocol)
             for p in sorted(root.glob("*.txt"))}
    if not tasks:
        raise ValueError(f"MME: no <task>.txt files in {root}")
    unknown = sorted(set(tasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        raise ValueError(f"MME: unknown task file(s) {', '.join(unknown)} in {root}")
    return {"tasks": tasks, "perception": sum(tasks[t]["score"] for t in MME_PERCEPTION if t in tasks),
            "cognition": sum(tasks[t]["score"] for t in MME_COGNITION if t in tasks),
            "missing": [t for t in MME_PERCEPTION + MME_COGNITION if t not in tasks]}


# ------------------------------------------------------------------------------------------------ GQA
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def score_gqa(predictions: Sequence[Mapping], questions: Mapping[str, Mapping], protocol: str = "llava"
              ) -> dict[str, Any]:
    """``predictions``: ``[{questionId, prediction}]``; ``questions``: the official ``{id: {answer, isBalanced,
    types: {structural}}}``. Exact match on balanced questions; binary / open (structural "query") splits.
    ``lmms-eval``: the raw reply, stripped, and the answer are lower-cased and lose ``string.punctuation``."""
    _check_protocol(protocol)
    if protocol == "lmms-eval":
        pred = {str(p["questionId"]): str(p["prediction"]).strip().lower().translate(_NO_PUNCTUATION)
                for p in predictions}
        questions = {k: {**q, "answer": str(q["answer"]).lower().translate(_NO_PUNCTUATION)}
                     for k, q in questions.items()}
    else:
        pred = {str(p["questionId"]): str(p["prediction"]).rstrip(".").lower() for p in predictions}
    right: dict[str, list[bool]] = {"all": [], "binary": [], "open": []}
    missing = 0
    for qid, q in questions.items():
        if not q.get("isBalanced", True):
            continue
        if qid not in pred:
            missing += 1
            continue
        ok = pred[qid] == q["answer"]
        right["all"].append(ok)
        right["open" if (q.get("types") or {}).get("structural") == "query" else "binary"].append(ok)
    if missing:
        raise ValueError(f"GQA: {missing} balanced questions have no prediction")
    return {k: 100 * sum(v) / len(v) if v else float("nan") for k, v in right.items()} | {"n": len(right["all"])}


# ------------------------------------------------------------------------------------------------ TextVQA
def textvqa_question(prompt: str) -> str:
    """LLaVA ``eval_textvqa.py``'s ``prompt_processor``: the question, lower-cased, out of a TextVQA prompt."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError(f"TextVQA: cannot find the question in the prompt {prompt[:60]!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"TextVQA: a prompt of {len(lines)} lines is none of LLaVA's layouts: {prompt[:60]!r}")
    return question.lower()


def score_textvqa(results: Sequence[Mapping], annotations: Sequence[Mapping], protocol: str = "llava"
                  ) -> dict[str, Any]:
    """The m4c evaluator's mean per-question accuracy (x100).

    LLaVA answer lines (``{question_id, prompt, text}``) are matched as LLaVA's ``eval_textvqa.py`` does: by
    ``(image_id, question)``, where LLaVA's question file stores the image id in ``question_id`` and the question is
    read back out of the prompt; every answer line is scored. Plain ``{question_id, answer}`` results are matched
    by question id and must cover every annotated question."""
    from .vqa_metric import textvqa_accuracy

    _check_protocol(protocol)
    rule = "llava" if protocol == "llava" else "lmms_eval"
    if results and "prompt" in results[0] and "text" in results[0]:
        by_key = {(a["image_id"], a["question"].lower()): a for a in annotations}
        accs = []
        for r in results:
            key = (r["question_id"], textvqa_question(r["prompt"]))
            if key not in by_key:
                raise ValueError(f"TextVQA: no annotation for image {key[0]!r} and question {key[1]!r}")
            accs.append(textvqa_accuracy(_reply(r["text"], protocol), by_key[key]["answers"], rule))
        return {"overall": 100 * sum(accs) / len(accs), "n": len(accs)}
    pred = {r["question_id"]: r["answer"] for r in results}
    missing = [a["question_id"] for a in annotations if a["question_id"] not in pred]
    if missing:
        raise ValueError(f"TextVQA: {len(missing)} annotated questions have no answer (e.g. {missing[0]})")
    accs = [textvqa_accuracy(_reply(pred[a["question_id"]], protocol), a["answers"], rule) for a in annotations]
    return {"overall": 100 * sum(accs) / len(accs), "n": len(accs)}


# ------------------------------------------------------------------------------------------------ CLI
def _reply(text: str, protocol: str) -> str:
    """lmms-eval strips every reply before scoring it; LLaVA's files hold replies already stripped."""
    return text.strip() if protocol == "lmms-eval" else text


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """The records of a JSONL file; a missing file or a bad line is an error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    out = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n}: invalid JSON ({err.msg})") from None
    return out


def _read_json_or_jsonl(path: str | Path) -> Any:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")) and not str(path).endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err.msg})") from None
    return read_jsonl(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scorer", required=True, metavar="BENCHMARK")
    s = sub.add_parser("pope", help="F1 / accuracy per POPE category (LLaVA's eval_pope.py)")
    s.add_argument("--result-file", required=True, help="answers JSONL {question_id, text}")
    s.add_argument("--question-file", required=True, help="llava_pope_test.jsonl {question_id, category}")
    s.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json")
    s = sub.add_parser("mme", help="MME task scores and perception / cognition totals (calculation.py)")
    s.add_argument("--results-dir", required=True, help="folder of <task>.txt (image, question, gt, answer)")
    s = sub.add_parser("gqa", help="GQA testdev-balanced accuracy (exact match)")
    given = s.add_mutually_exclusive_group(required=True)
    given.add_argument("--answers", help="LLaVA answers JSONL {question_id, text} (converted as "
                                         "convert_gqa_for_eval.py does)")
    given.add_argument("--predictions", help="[{questionId, prediction}] JSON (convert_gqa_for_eval.py's output)")
    s.add_argument("--questions", required=True, help="testdev_balanced_questions.json")
    for name in ("vqav2", "textvqa"):
        s = sub.add_parser(name, help=f"{name} accuracy (official normalisation and 10-answer rule)")
        given = s.add_mutually_exclusive_group(required=True)
        given.add_argument("--answers", help="LLaVA answers JSONL {question_id, prompt, text}")
        given.add_argument("--result-file", help="[{question_id, answer}] JSON or JSONL")
        s.add_argument("--annotations", required=True,
                       help="official annotation JSON ({'annotations': [...]} / {'data': [...]}) or a list of "
                            "{question_id, answers}")
        s.add_argument("--questions", default=None,
                       help="official questions JSON ({'questions': [...]}): score only the questions it lists")
    s = sub.add_parser("geneval", help="GenEval per-task and overall scores of a results.jsonl (summary_scores.py)")
    s.add_argument("results", help="results.jsonl written by GenEval's evaluate_images.py (or ours)")
    for name, s in sub.choices.items():
        s.add_argument("--out", default=None, help="also write the figures as JSON here")
        if name != "geneval":
            s.add_argument("--protocol", choices=PROTOCOLS, default="llava",
                           help="llava: the LLaVA / UniTok scripts (the papers' numbers); lmms-eval: lmms-eval "
                                ">= 0.6's task rules on the same answers")


def run(args: argparse.Namespace) -> int:
    from metrics.geneval import summarize
    from .vqa_metric import evaluate_vqa

    if args.scorer == "pope":
        out = score_pope(read_jsonl(args.result_file), read_jsonl(args.question_file), args.annotation_dir,
                         protocol=args.protocol)
        for cat, v in out["per_category"].items():
            print(f"{cat:<12} TP {v['TP']} FP {v['FP']} TN {v['TN']} FN {v['FN']}  acc {v['accuracy']:.3f}  "
                  f"precision {v['precision']:.3f}  recall {v['recall']:.3f}  F1 {v['f1']:.3f}  "
                  f"yes {v['yes_ratio']:.3f}")
        print(f"POPE mean F1 {out['f1']:.1f}   (mean accuracy {out['accuracy']:.1f})")
    elif args.scorer == "mme":
        out = score_mme(args.results_dir, args.protocol)
        for t, v in out["tasks"].items():
            print(f"{t:<24} score {v['score']:.2f}  (acc {v['acc']:.2f}, acc+ {v['acc_plus']:.2f})")
        print(f"MME perception {out['perception']:.2f}   cognition {out['cognition']:.2f}"
              + (f"   (missing tasks: {', '.join(out['missing'])})" if out["missing"] else ""))
    elif args.scorer == "gqa":
        questions = _read_json_or_jsonl(args.questions)
        # convert_gqa_for_eval.py's rstrip('.').lower(); lmms-eval scores the raw reply
        convert = (lambda t: t) if args.protocol == "lmms-eval" else (lambda t: t.rstrip(".").lower())
        predictions = (_read_json_or_jsonl(args.predictions) if args.predictions else
                       [{"questionId": r["question_id"], "prediction": convert(r["text"])}
                        for r in _as_records(read_jsonl(args.answers, "answers file"))])
        out = score_gqa(predictions, questions, args.protocol)
        print(f"GQA accuracy {out['all']:.2f}  (binary {out['binary']:.2f}, open {out['open']:.2f}, n={out['n']})")
    elif args.scorer in ("vqav2", "textvqa"):
        ann = _read_json_or_jsonl(args.annotations)
        ann = _as_records(ann.get("annotations", ann.get("data")) if isinstance(ann, dict) else ann)
        if args.questions:
            listed = _read_json_or_jsonl(args.questions)
            listed = {q["question_id"] for q in (listed["questions"] if isinstance(listed, dict) else listed)}
            ann = [a for a in ann if a["question_id"] in listed]
        if args.answers:
            results = _as_records(read_jsonl(args.answers, "answers file"))
            if args.scorer == "vqav2":
                results = [{"question_id": r["question_id"], "answer": r["text"]} for r in results]
        else:
            results = _as_records(_read_json_or_jsonl(args.result_file))
        if args.scorer == "vqav2" and args.protocol == "lmms-eval":  # vqav2_val: the mean of per-question values
            res = evaluate_vqa(ann, [{**r, "answer": r["answer"].strip()} for r in results], "lmms_eval_0.7")
            out = {k: v for k, v in res.items() if k not in ("acc", "evalQA")}
            out["overall"] = 100 * sum(res["acc"].values()) / len(res["acc"])
        elif args.scorer == "vqav2":  # LLaVA's submission pipeline: EvalAI answer processor, then vqaEval.py
            res = evaluate_vqa(ann, results, "llava")
            out = {k: v for k, v in res.items() if k not in ("acc", "evalQA")}
        else:
            out = score_textvqa(results, ann, args.protocol)
        print(f"{args.scorer} accuracy {out['overall']:.2f}")
    else:
        out = summarize(read_jsonl(args.results))
        for t, v in out["per_task"].items():
            print(f"{t:<16} {v:.5f}")
        print(f"GenEval overall {out['overall']:.5f}  (images {out['n_images']}, prompts {out['n_prompts']})")
    if args.out:
        figures = official_keys(args.scorer, out)
        if args.scorer != "geneval":
            figures["protocol"] = args.protocol
        Path(args.out).write_text(json.dumps(figures, indent=1, default=str) + "\n")
    return 0


def official_keys(scorer: str, out: dict) -> dict:
    """The figures of ``--out`` under the keys the official scripts' users know (issue-level contract)."""
    if scorer == "pope":
        return {**out["per_category"], "mean": {"f1": out["f1"], "accuracy": out["accuracy"]}}
    if scorer == "mme":
        return {"Perception": {"total": out["perception"],
                               "tasks": {t: v for t, v in out["tasks"].items() if t in MME_PERCEPTION}},
                "Cognition": {"total": out["cognition"],
                              "tasks": {t: v for t, v in out["tasks"].items() if t in MME_COGNITION}},
                "missing": out["missing"]}
    if scorer == "gqa":
        return {"accuracy": out["all"], "binary": out["binary"], "open": out["open"], "n": out["n"]}
    if scorer == "geneval":
        return {"tasks": out["per_task"], "overall": out["overall"], "n_images": out["n_images"],
                "n_prompts": out["n_prompts"]}
    return out


def _as_records(rows: Iterable[Any]) -> list[dict]:
    rows = list(rows)
    if not all(isinstance(r, dict) and "question_id" in r for r in rows):
        raise ValueError("expected records with a question_id field")
    return rows


__all__ = ["pope_answer", "pope_scores", "score_pope", "mme_answer", "score_mme_task", "score_mme", "score_gqa",
           "score_textvqa"]
