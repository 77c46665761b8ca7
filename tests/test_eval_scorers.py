"""The official scoring rules of `unitok eval score` (eval/scorers.py), on the traps `../shared/notes/eval_spec.md`
lists: POPE's first-sentence, case-sensitive parse and positional pairing, MME's 4-character parse and acc+ pairs,
GQA's exact match, GenEval's unweighted per-task mean."""
from __future__ import annotations

import json

import pytest

import unitok_cli
from conftest import fixture_dir
from eval.scorers import mme_answer, pope_answer, pope_scores, score_gqa, score_mme_task, score_pope, score_textvqa


@pytest.mark.parametrize("text, parsed", [
    ("NO", "yes"), ("Not", "yes"), ("Nope", "yes"), ("no!", "yes"), ("", "yes"), ("There is no dog.", "no"),
    ("Yes, but no cat", "no"), ("Yes. No.", "yes"), ("3.5 no", "yes"), ("No", "no"), ("No, there is not.", "no"),
    ("yes\nno", "yes"),  # split on spaces only: "yes\nno" is one word
])
def test_pope_parse_is_eval_pope_py(text, parsed):
    assert pope_answer(text) == parsed


def test_pope_figures_and_the_degenerate_case():
    s = pope_scores(["Yes", "No", "Yes.", "no", "There is not."], ["yes", "no", "no", "yes", "no"])
    assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (1, 1, 2, 1)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5 and s["accuracy"] == 0.6
    assert s["yes_ratio"] == 0.4
    with pytest.raises(ValueError, match="no answer parsed as yes"):
        pope_scores(["No", "no"], ["yes", "no"])
    with pytest.raises(ValueError, match="3 answers, 2 labels"):
        pope_scores(["Yes"] * 3, ["yes", "no"])


def test_pope_on_the_real_label_files_pairs_answers_by_position(tmp_path):
    root = fixture_dir("eval_data", "pope_coco")
    questions, results, expected = [], [], {}
    qid = 0
    for cat in ("adversarial", "popular", "random"):
        labels = [json.loads(line)["label"] for line in open(root / f"coco_pope_{cat}.json")]
        wrong = 0
        for lab in labels:
            qid += 1
            questions.append({"question_id": qid, "category": cat})
            if lab == "no" and wrong < 10:  # ten false alarms per category
                answer, wrong = "Yes, there is.", wrong + 1
            else:
                answer = "Yes" if lab == "yes" else "No, there is not."
            results.append({"question_id": qid, "text": answer})
        yes = labels.count("yes")
        precision, recall = yes / (yes + 10), 1.0
        expected[cat] = (yes, 10, labels.count("no") - 10, 0, 2 * precision * recall / (precision + recall))
    out = score_pope(results, questions, root)
    assert set(out["per_category"]) == set(expected)
    for cat, (tp, fp, tn, fn, f1) in expected.items():
        s = out["per_category"][cat]
        assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (tp, fp, tn, fn) and s["f1"] == pytest.approx(f1, abs=1e-12)
    assert out["per_category"]["random"]["n"] == 2910  # LLaVA's pinned split
    assert out["f1"] == pytest.approx(100 * sum(e[4] for e in expected.values()) / 3, abs=1e-9)
    # through the CLI, with the official file layout
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    assert unitok_cli.main(["eval", "score", "pope", "--result-file", str(tmp_path / "a.jsonl"), "--question-file",
                            str(tmp_path / "q.jsonl"), "--annotation-dir", str(root), "--out",
                            str(tmp_path / "pope.json")]) == 0
    written = json.loads((tmp_path / "pope.json").read_text())  # the keys: {category: {TP, ..., f1}}
    assert written["mean"]["f1"] == pytest.approx(out["f1"])
    assert {k: written[k] for k in expected} == json.loads(json.dumps(out["per_category"]))
    assert set(written["random"]) >= {"TP", "FP", "TN", "FN", "accuracy", "precision", "recall", "f1", "yes_ratio"}


@pytest.mark.parametrize("pred, parsed", [
    ("yes", "yes"), ("no", "no"), ("yes\n", "yes"), ("no.\n", "no"), ("yesterday", "yes"), ("y", "other"),
    ("n", "other"), ("know", "no"), ("not sure", "no"), ("none", "no"), ("the answer is yes", "other"),
])
def test_mme_parse_is_calculation_py(pred, parsed):
    assert mme_answer(pred) == parsed


def test_mme_task_score_is_acc_plus_acc_plus(tmp_path, capsys):
    lines = ["a.png\tIs it red? Please answer yes or no.\tYes\tYes\n",
             "a.png\tIs it blue? Please answer yes or no.\tNo\tno\n",
             "b.png\tIs there a cat? Please answer yes or no.\tYes\tThe answer is yes\n",
             "b.png\tIs there a dog? Please answer yes or no.\tNo\tNot sure\n"]
    s = score_mme_task(lines)
    assert (s["acc"], s["acc_plus"], s["score"]) == (75.0, 50.0, 125.0)
    with pytest.raises(ValueError, match="3 lines; the official script pairs 2 lines per image"):
        score_mme_task(lines[:3])
    (tmp_path / "mme").mkdir()
    (tmp_path / "mme" / "color.txt").write_text("".join(lines))
    (tmp_path / "mme" / "code_reasoning.txt").write_text("".join(lines[:2]))
    assert unitok_cli.main(["eval", "score", "mme", "--results-dir", str(tmp_path / "mme"), "--out",
                            str(tmp_path / "mme.json")]) == 0
    out = capsys.readouterr().out
    assert "MME perception 125.00   cognition 200.00" in out
    written = json.loads((tmp_path / "mme.json").read_text())
    assert written["Perception"]["total"] == 125.0 and set(written["Perception"]["tasks"]) == {"color"}
    assert written["Cognition"] == {"total": 200.0, "tasks": {"code_reasoning": score_mme_task(lines[:2])}}


def test_gqa_and_vqav2_take_llava_answer_files(tmp_path):
    """`gqa --answers A.jsonl --questions Q.json` and `vqav2 --answers A.jsonl --annotations F --questions F`:
    LLaVA's answer lines, converted as its convert scripts do."""
    answers = [{"question_id": "1", "prompt": "q", "text": "The man."}, {"question_id": "2", "prompt": "q",
                                                                           "text": "Yes."}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    (tmp_path / "q.json").write_text(json.dumps({"1": {"answer": "the man", "isBalanced": True},
                                                 "2": {"answer": "yes", "isBalanced": True,
                                                       "types": {"structural": "verify"}}}))
    assert unitok_cli.main(["eval", "score", "gqa", "--answers", str(tmp_path / "a.jsonl"), "--questions",
                            str(tmp_path / "q.json"), "--out", str(tmp_path / "gqa.json")]) == 0
    assert json.loads((tmp_path / "gqa.json").read_text())["accuracy"] == 100.0  # rstrip('.').lower()

    vqa = [{"question_id": 1, "prompt": "q", "text": "Two"}, {"question_id": 2, "prompt": "q", "text": "red"},
           {"question_id": 3, "prompt": "q", "text": "x"}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    ann = {"annotations": [{"question_id": i, "answer_type": "other", "question_type": "what",
                            "answers": [{"answer": a, "answer_id": k + 1} for k in range(10)]}
                           for i, a in ((1, "2"), (2, "blue"), (3, "x"))]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "qs.json").write_text(json.dumps({"questions": [{"question_id": 1}, {"question_id": 2}]}))
    v = vqa[:2]
    (tmp_path / "v2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v))
    assert unitok_cli.main(["eval", "score", "vqav2", "--answers", str(tmp_path / "v2.jsonl"), "--annotations",
                            str(tmp_path / "ann.json"), "--questions", str(tmp_path / "qs.json"), "--out",
                            str(tmp_path / "vqa.json")]) == 0
    written = json.loads((tmp_path / "vqa.json").read_text())
    assert written["overall"] == 50.0 and set(written) == {"overall", "perAnswerType", "perQuestionType", "protocol"}


def test_gqa_is_exact_match_on_balanced_questions():
    questions = {"1": {"answer": "man", "isBalanced": True, "types": {"structural": "query"}},
                 "2": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
                 "3": {"answer": "gray", "isBalanced": True, "types": {"structural": "query"}},
                 "4": {"answer": "no", "isBalanced": False}}
    preds = [{"questionId": "1", "prediction": "The man"}, {"questionId": "2", "prediction": "Yes."},
             {"questionId": "3", "prediction": "grey"}]
    out = score_gqa(preds, questions)
    assert out["all"] == pytest.approx(100 / 3) and out["binary"] == 100.0 and out["open"] == 0.0 and out["n"] == 3
    with pytest.raises(ValueError, match="1 balanced questions have no prediction"):
        score_gqa(preds[:2], questions)


def test_textvqa_mean_of_m4c_scores():
    ann = [{"question_id": 1, "answers": ["coca cola"] * 10}, {"question_id": 2, "answers": ["stop"] * 2 + ["x"] * 8}]
    out = score_textvqa([{"question_id": 1, "answer": "Coca Cola"}, {"question_id": 2, "answer": "stop"}], ann)
    assert out["overall"] == pytest.approx(100 * (1.0 + 0.6) / 2)


def test_geneval_summary_is_the_unweighted_mean_of_tasks(tmp_path, capsys):
    rows = [{"tag": "single_object", "correct": True, "metadata": "a"}, {"tag": "single_object", "correct": True,
                                                                         "metadata": "a"},
            {"tag": "counting", "correct": False, "metadata": "b"}, {"tag": "counting", "correct": True,
                                                                     "metadata": "c"},
            {"tag": "counting", "correct": False, "metadata": "c"}, {"tag": "counting", "correct": False,
                                                                     "metadata": "d"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert unitok_cli.main(["eval", "score", "geneval", str(tmp_path / "results.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "GenEval overall 0.62500" in out  # (1.0 + 0.25) / 2, not 3/6 over images
