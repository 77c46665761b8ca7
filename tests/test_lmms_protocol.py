"""`unitok eval score ... --protocol lmms-eval`: the same answers scored as lmms-eval >= 0.6's tasks score them.
Hand-computed cases show where the protocols part; where lmms-eval is installed ($UNITOK_LMMS_EVAL_PATH, as .ci/run
does) its own task functions score the same records and every figure must be equal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unitok_cli
from eval.scorers import pope_scores, score_gqa, score_mme_task

LMMS = os.environ.get("UNITOK_LMMS_EVAL_PATH")

POPE_ANSWERS = ["Yes", "Yes.", "no", "No, there is not", "yes", " no ", "There is no dog.", "Nope", "NO", "yes"]
POPE_LABELS = ["yes", "yes", "no", "no", "no", "yes", "no", "yes", "no", "yes"]
MME_LINES = [  # (image, question, gt, answer); the two questions of b.png are not on consecutive lines
    ("a.png", "Is it red?", "Yes", "Yes."), ("b.png", "Is there a cat?", "Yes", "Y"),
    ("a.png", "Is it blue?", "No", "no"), ("b.png", "Is there a dog?", "No", "N"),
    ("c.png", "Is it big?", "Yes", "yesterday"), ("c.png", "Is it small?", "No", "Not sure."),
    ("d.png", "Is it a cow?", "Yes", "the answer is yes"), ("d.png", "Is it a dog?", "No", "no.")]
GQA = [("1", "T-shirt", "tshirt"), ("2", "Yes.", "yes"), ("3", "The man", "man"), ("4", " grey ", "grey"),
       ("5", "left,", "left"), ("6", "Man.", "man")]
VQA = [(1, "Two", ["2"] * 10), (2, "two dogs.", ["2 dogs"] * 4 + ["dogs"] * 6), (3, " red\n", ["red"] * 2 + ["x"] * 8),
       (4, "yes", ["yes"] * 9 + ["no"]), (5, "a\tdog", ["dog"] * 10)]
TEXTVQA = [(1, "Coca-Cola", ["coca cola"] * 6 + ["coke"] * 4), (2, " STOP ", ["stop"] * 2 + ["x"] * 8),
           (3, "the 3", ["3"] * 10)]


def test_pope_protocols_differ_where_lmms_eval_says():
    llava, lmms = pope_scores(POPE_ANSWERS, POPE_LABELS), pope_scores(POPE_ANSWERS, POPE_LABELS, "lmms-eval")
    # LLaVA: first sentence, whole-word No/no/not; "NO" and "Nope" parse as yes, "Yes." as yes
    assert (llava["TP"], llava["FP"], llava["TN"], llava["FN"]) == (4, 2, 3, 1)
    # lmms-eval: exact yes/no after lower().strip(): "Yes.", "no, there is not", "there is no dog.", "nope" are
    # neither; "NO" and " no " are no
    assert (lmms["TP"], lmms["FP"], lmms["TN"], lmms["FN"]) == (2, 1, 2, 1)
    assert lmms["accuracy"] == 0.4 and lmms["precision"] == 2 / 3 and lmms["recall"] == 2 / 3
    assert lmms["yes_ratio"] == 0.5 and llava["yes_ratio"] == 0.6  # ground truth's vs predictions'


def test_mme_protocols_differ_where_lmms_eval_says():
    lines = ["\t".join(row) + "\n" for row in MME_LINES]
    lmms = score_mme_task(lines, "t", "lmms-eval")
    # by image: a 2/2, b 2/2 ("Y"/"N" accepted), c 2/2 ("yesterday"[:4], "not sure" -> no), d 1/2 ("the answer...")
    assert (lmms["acc"], lmms["acc_plus"], lmms["score"]) == (87.5, 75.0, 162.5)
    llava = score_mme_task(lines, "t")
    # consecutive lines: (a, b) (a, b) (c, c) (d, d); "Y"/"N" are other; "yes." is yes by [:4]; "no." -> no
    assert (llava["acc"], llava["acc_plus"]) == (62.5, 25.0)
    with pytest.raises(ValueError, match="image b.png has 1 answers"):
        score_mme_task(lines[:3] + lines[4:], "t", "lmms-eval")


def test_gqa_protocols_differ_where_lmms_eval_says():
    questions = {q: {"answer": a, "isBalanced": True} for q, _, a in GQA}
    preds = [{"questionId": q, "prediction": p} for q, p, _ in GQA]
    # lmms-eval: "T-shirt" = "tshirt", "left," = "left", " grey " = "grey"; "the man" != "man" in both
    assert score_gqa(preds, questions, "lmms-eval")["all"] == pytest.approx(100 * 5 / 6)
    # LLaVA's converted predictions (rstrip('.').lower()): "yes", "man" right, the rest wrong
    converted = [{**p, "prediction": p["prediction"].rstrip(".").lower()} for p in preds]
    assert score_gqa(converted, questions)["all"] == pytest.approx(100 * 2 / 6)


def write_inputs(root: Path) -> dict[str, list[str]]:
    """The records above in the files `unitok eval score` reads; returns each scorer's arguments."""
    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / name)

    cats = ["adversarial"] * 5 + ["random"] * 5
    questions = jsonl("pope_q.jsonl", [{"question_id": i, "category": c} for i, c in enumerate(cats)])
    answers = jsonl("pope_a.jsonl", [{"question_id": i, "text": a} for i, a in enumerate(POPE_ANSWERS)])
    (root / "coco").mkdir(exist_ok=True)
    for cat in ("adversarial", "random"):
        (root / "coco" / f"coco_pope_{cat}.json").write_text("".join(
            json.dumps({"label": lab}) + "\n" for lab, c in zip(POPE_LABELS, cats) if c == cat))
    (root / "mme").mkdir(exist_ok=True)
    (root / "mme" / "color.txt").write_text("".join("\t".join(r) + "\n" for r in MME_LINES))
    (root / "mme" / "OCR.txt").write_text("".join("\t".join(r) + "\n" for r in MME_LINES[4:]))
    gqa_a = jsonl("gqa_a.jsonl", [{"question_id": q, "prompt": "q", "text": p} for q, p, _ in GQA])
    (root / "gqa_q.json").write_text(json.dumps({q: {"answer": a, "isBalanced": True} for q, _, a in GQA}))
    vqa_a = jsonl("vqa_a.jsonl", [{"question_id": q, "prompt": "q", "text": p} for q, p, _ in VQA])
    (root / "vqa_ann.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "answer_type": "other", "question_type": "what",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(gts)]}
        for q, _, gts in VQA]}))
    tv_r = jsonl("textvqa_r.jsonl", [{"question_id": q, "answer": p} for q, p, _ in TEXTVQA])
    (root / "textvqa_ann.json").write_text(json.dumps({"data": [{"question_id": q, "answers": g}
                                                                for q, _, g in TEXTVQA]}))
    return {"pope": ["--result-file", answers, "--question-file", questions, "--annotation-dir", str(root / "coco")],
            "mme": ["--results-dir", str(root / "mme")],
            "gqa": ["--answers", gqa_a, "--questions", str(root / "gqa_q.json")],
            "vqav2": ["--answers", vqa_a, "--annotations", str(root / "vqa_ann.json")],
            "textvqa": ["--result-file", tv_r, "--annotations", str(root / "textvqa_ann.json")]}


def ours(root: Path, args: dict[str, list[str]]) -> dict[str, dict]:
    out = {}
    for name, a in args.items():
        assert unitok_cli.main(["eval", "score", name, *a, "--protocol", "lmms-eval", "--out",
                                str(root / f"{name}.json")]) == 0
        out[name] = json.loads((root / f"{name}.json").read_text())
        assert out[name]["protocol"] == "lmms-eval"
    return out


def test_every_scorer_takes_the_lmms_eval_protocol(tmp_path, capsys):
    got = ours(tmp_path, write_inputs(tmp_path))
    assert got["gqa"]["accuracy"] == pytest.approx(100 * 5 / 6)
    assert got["pope"]["adversarial"]["yes_ratio"] == 0.4 and got["pope"]["random"]["yes_ratio"] == 0.6
    # VQAv2: "Two" -> 2 (1.0); "two dogs." -> "2 dogs" (4 of 10: 3 or 4 others match, capped: 1.0);
    # " red\n" -> red (2 of 10: leave-one-out (2 x 1/3 + 8 x 2/3) / 10 = 0.6); "yes" (9 of 10: 1.0);
    # "a\tdog" -> "dog" (1.0)
    assert got["vqav2"]["overall"] == pytest.approx(100 * (1 + 1 + 0.6 + 1 + 1) / 5)
    with pytest.raises(SystemExit):  # argparse: a choice
        unitok_cli.main(["eval", "score", "gqa", "--answers", str(tmp_path / "gqa_a.jsonl"), "--questions",
                         str(tmp_path / "gqa_q.json"), "--protocol", "lmms"])
    assert "invalid choice: 'lmms'" in capsys.readouterr().err


LMMS_DRIVER = r'''
import json, sys
from collections import defaultdict
from lmms_eval.api.metrics import exact_match_hf_evaluate
from lmms_eval.tasks.gqa import utils as _gqa  # noqa: F401  (the task module imports)
from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results
from lmms_eval.tasks.pope import utils as pope
from lmms_eval.tasks.textvqa.utils import textvqa_process_results
from lmms_eval.tasks.vqav2.utils import vqav2_process_results

d = json.loads(open(sys.argv[1]).read())
strip = lambda s: s.strip()  # lmms_eval.api.task.Task.process_results strips every reply first
out = {"pope": {}}
for cat, rows in d["pope"].items():
    res = [pope.pope_process_results({"question_id": i, "answer": lab}, [strip(a)])["pope_accuracy"]
           for i, (a, lab) in enumerate(rows)]
    out["pope"][cat] = {"accuracy": pope.pope_aggregate_accuracy(res), "precision": pope.pope_aggregate_precision(res),
                        "recall": pope.pope_aggregate_recall(res), "f1": pope.pope_aggregate_f1_score(res),
                        "yes_ratio": pope.pope_aggregate_yes_ratio(res)}
per = defaultdict(list)
for task, rows in d["mme"].items():
    for image, gt, pred in rows:
        r = mme_process_results({"question_id": task + "/" + image, "answer": gt, "category": task}, [strip(pred)])
        per[next(iter(r))].append(next(iter(r.values())))
out["mme"] = {"Perception": mme_aggregate_results(per["mme_perception_score"])}
out["gqa"] = 100 * sum(exact_match_hf_evaluate([strip(p)], [g], ignore_case=True, ignore_punctuation=True)
                       ["exact_match"] for p, g in d["gqa"]) / len(d["gqa"])
out["vqav2"] = 100 * sum(vqav2_process_results({"question_id": 0, "answers": gts}, [strip(p)])["exact_match"]
                         for p, gts in d["vqav2"]) / len(d["vqav2"])
out["textvqa"] = 100 * sum(textvqa_process_results({"question_id": 0, "answers": gts}, [strip(p)])["exact_match"]
                           for p, gts in d["textvqa"]) / len(d["textvqa"])
print(json.dumps(out))
'''


@pytest.mark.skipif(not (LMMS and (Path(LMMS) / "lmms_eval").is_dir()),
                    reason="lmms-eval not installed: set UNITOK_LMMS_EVAL_PATH (.ci/lmms-eval-deps.txt)")
def test_lmms_eval_protocol_equals_lmms_eval_own_task_code(tmp_path):
    got = ours(tmp_path, write_inputs(tmp_path))
    cats = ["adversarial"] * 5 + ["random"] * 5
    records = {
        "pope": {c: [(a, lab) for a, lab, k in zip(POPE_ANSWERS, POPE_LABELS, cats) if k == c]
                 for c in ("adversarial", "random")},
        "mme": {"color": [(r[0], r[2], r[3]) for r in MME_LINES], "OCR": [(r[0], r[2], r[3]) for r in MME_LINES[4:]]},
        "gqa": [(p, a) for _, p, a in GQA],
        "vqav2": [(p, [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(g)])
                  for _, p, g in VQA],
        "textvqa": [(p, g) for _, p, g in TEXTVQA]}
    (tmp_path / "records.json").write_text(json.dumps(records))
    (tmp_path / "driver.py").write_text(LMMS_DRIVER)
    env = {**os.environ, "PYTHONPATH": LMMS, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "records.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for cat, figures in theirs["pope"].items():
        for k, v in figures.items():
            assert got["pope"][cat][k] == v, (cat, k)
    assert got["mme"]["Perception"]["total"] == theirs["mme"]["Perception"]
    assert got["gqa"]["accuracy"] == theirs["gqa"]
    assert got["vqav2"]["overall"] == theirs["vqav2"]
    assert got["textvqa"]["overall"] == theirs["textvqa"]
