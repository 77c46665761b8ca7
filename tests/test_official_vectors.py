"""Scorers against figures printed by the official scripts themselves, run once on the inputs generated below:
LLaVA's ``llava/eval/eval_pope.py`` (@ 4241f08), MME's ``eval_tool/calculation.py`` (with scikit-learn 1.9.1) and
GenEval's ``evaluation/summary_scores.py`` (@ af4902f, pandas 3).
The inputs are drawn from pools of answers that hit each script's parsing traps; the expected values are the
scripts' own printed floats (``repr``), so equality is exact."""
from __future__ import annotations

import json
import random
from pathlib import Path

from metrics.geneval import summarize
from eval.scorers import read_jsonl, score_mme, score_pope

POPE_POOL = ["Yes", "No", "Yes.", "No.", "yes", "no", "Yes, there is a dog.", "No, there is not.", "There is no dog.",
             "NO", "Not", "Nope", "no!", "", "Yes. No.", "3.5 no", "yes\nno", "I think not", "Yes, but no cat",
             "The answer is yes", "there is not a cat."]
MME_POOL = ["Yes", "No", "yes", "no", "Yes.", "No.", "yesterday", "y", "n", "know", "Not sure", "none",
            "the answer is yes", "YES", "No, it is not.", "", "Yes, it is", "nope", "maybe"]
MME_TASKS = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
             "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def write_pope(root: Path) -> None:
    rng = random.Random(7)
    questions, answers = [], []
    (root / "coco").mkdir(parents=True, exist_ok=True)
    qid = 0
    for cat in ("adversarial", "popular", "random"):
        labels = []
        for _ in range(30 + 5 * len(cat) % 7):
            qid += 1
            labels.append(rng.choice(["yes", "no"]))
            questions.append({"question_id": qid, "category": cat})
            answers.append({"question_id": qid, "text": rng.choice(POPE_POOL)})
        (root / "coco" / f"coco_pope_{cat}.json").write_text("".join(json.dumps({"label": lab}) + "\n" for lab in labels))
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))


def write_mme(root: Path) -> None:
    rng = random.Random(11)
    (root / "mme").mkdir(parents=True, exist_ok=True)
    for t, task in enumerate(MME_TASKS):
        lines = []
        for i in range(3 + t % 4):
            for q, gt in enumerate(rng.sample(["Yes", "No"], 2)):
                lines.append(f"{task}_{i}.png\tQuestion {q}? Please answer yes or no.\t{gt}\t{rng.choice(MME_POOL)}\n")
        (root / "mme" / f"{task}.txt").write_text("".join(lines))


# eval_pope.py's printout per category: TP FP TN FN, then Accuracy / Precision / Recall / F1 score / Yes ratio
POPE_OFFICIAL = {
    "adversarial": (9, 9, 7, 11, 0.4444444444444444, 0.5, 0.45, 0.4736842105263158, 0.5),
    "popular": (8, 13, 4, 5, 0.4, 0.38095238095238093, 0.6153846153846154, 0.47058823529411764, 0.7),
    "random": (10, 13, 3, 6, 0.40625, 0.43478260869565216, 0.625, 0.5128205128205128, 0.71875),
}
# calculation.py's printout: per task score, and the two totals
MME_OFFICIAL = {
    "existence": 99.99999999999999, "count": 75.0, "position": 10.0, "color": 33.33333333333333,
    "posters": 16.666666666666664, "celebrity": 37.5, "scene": 30.0, "landmark": 41.666666666666664,
    "artwork": 33.33333333333333, "OCR": 25.0, "commonsense_reasoning": 100.0,
    "numerical_calculation": 83.33333333333333, "text_translation": 16.666666666666664, "code_reasoning": 25.0,
}
MME_TOTALS = (402.5, 224.99999999999997)


def test_pope_equals_eval_pope_py(tmp_path):
    write_pope(tmp_path)
    out = score_pope(read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "q.jsonl"), tmp_path / "coco")
    for cat, (tp, fp, tn, fn, acc, precision, recall, f1, yes) in POPE_OFFICIAL.items():
        s = out["per_category"][cat]
        assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (tp, fp, tn, fn), cat
        assert (s["accuracy"], s["precision"], s["recall"], s["f1"], s["yes_ratio"]) == (acc, precision, recall, f1,
                                                                                         yes), cat


def test_mme_equals_calculation_py(tmp_path):
    write_mme(tmp_path)
    out = score_mme(tmp_path / "mme")
    assert {t: v["score"] for t, v in out["tasks"].items()} == MME_OFFICIAL
    assert (out["perception"], out["cognition"]) == MME_TOTALS


def write_geneval_results(path: Path) -> None:
    """GenEval results.jsonl (evaluate_images.py's fields) with its summary's traps: tags first seen in an unsorted
    order, 1-4 images per prompt, two prompts with one text but different metadata, prompts with no correct image."""
    rng = random.Random(11)
    tags = ["two_object", "colors", "single_object", "counting", "position", "color_attr"]
    rows = []
    for p in range(40):
        tag = tags[p % 6] if p < 12 else rng.choice(tags)
        text = "a photo of a cat" if p in (3, 17) else f"prompt {p}"
        metadata = json.dumps({"tag": tag, "prompt": text, "include": [{"class": "cat", "count": 1 + p % 3}]})
        for _ in range(rng.randint(1, 4)):
            rows.append({"filename": f"{p:05d}.png", "tag": tag, "prompt": text, "correct": rng.random() < 0.45,
                         "reason": "", "metadata": metadata, "details": "{}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# summary_scores.py's printout on write_geneval_results' file: per task "(correct / images)" in its order, the
# overall to its 5 decimals, and the image / prompt totals and percentages
GENEVAL_OFFICIAL = {"two_object": (7, 14), "colors": (13, 18), "single_object": (6, 10), "counting": (16, 28),
                    "position": (7, 15), "color_attr": (6, 12)}
GENEVAL_PRINTED = {"overall": "0.56005", "images": 97, "prompts": 40, "correct_images": "56.70%",
                   "correct_prompts": "82.50%"}


def test_geneval_summary_equals_summary_scores_py(tmp_path):
    write_geneval_results(tmp_path / "results.jsonl")
    out = summarize(read_jsonl(tmp_path / "results.jsonl"))
    assert list(out["per_task"]) == list(GENEVAL_OFFICIAL)  # first-appearance order, as groupby(sort=False)
    assert {t: out["per_task"][t] for t in GENEVAL_OFFICIAL} == {t: k / n for t, (k, n) in GENEVAL_OFFICIAL.items()}
    assert f"{out['overall']:.5f}" == GENEVAL_PRINTED["overall"]
    assert (out["n_images"], out["n_prompts"]) == (GENEVAL_PRINTED["images"], GENEVAL_PRINTED["prompts"])
    assert f"{out['correct_images']:.2%}" == GENEVAL_PRINTED["correct_images"]
    assert f"{out['correct_prompts']:.2%}" == GENEVAL_PRINTED["correct_prompts"]
