"""Official VQA metric (and the LLaVA / TextVQA / lmms-eval variants) against the reference test vectors."""
from __future__ import annotations

import json

import pytest

from eval import vqa_metric as V


@pytest.fixture(scope="module")
def cases():
    from conftest import fixture_dir
    data = json.loads((fixture_dir("eval_vectors") / "vqa_accuracy.json").read_text())
    assert data["cases"]
    return data["cases"]


def _same(actual, expected):
    """Exact equality, including int-vs-float where the reference produced a float."""
    if isinstance(expected, float):
        return isinstance(actual, float) and actual == expected
    return actual == expected


def test_vqa_official_vectors(cases):
    for c in cases:
        got = V.vqa_official(c["prediction"], c["gt_answers"])
        for key, exp in c["expected"]["vqa_official"].items():
            assert _same(got[key], exp), (c["question_id"], c["rule"], key, got[key], exp)
        # dict-form GT answers (as in the annotation file) give the same result
        dicts = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(c["gt_answers"])]
        assert V.vqa_official(c["prediction"], dicts)["acc"] == got["acc"]
        assert V.vqa_accuracy(c["prediction"], c["gt_answers"], "official") == got["acc"]


def test_llava_vqav2_pipeline_vectors(cases):
    for c in cases:
        got = V.llava_vqav2(c["prediction"], c["gt_answers"])
        for key, exp in c["expected"]["llava_vqav2_pipeline"].items():
            assert _same(got[key], exp), (c["question_id"], c["rule"], key, got[key], exp)
        assert V.vqa_accuracy(c["prediction"], c["gt_answers"]) == got["acc"]  # the default protocol


def test_textvqa_m4c_vectors(cases):
    for c in cases:
        got = V.textvqa_m4c(c["prediction"], c["gt_answers"])
        for key, exp in c["expected"]["textvqa_m4c"].items():
            assert _same(got[key], exp), (c["question_id"], c["rule"], key, got[key], exp)
        assert V.textvqa_accuracy(c["prediction"], c["gt_answers"]) == got["acc"]


@pytest.mark.parametrize("version,key", [("0.7", "lmms_eval_0_7"), ("0.3", "lmms_eval_0_3")])
def test_lmms_eval_vectors(cases, version, key):
    for c in cases:
        exp = c["expected"][key]
        got = V.lmms_eval_vqav2(c["prediction"], c["gt_answers"], version)
        assert got["exact_match"] == exp["vqav2_val_exact_match"], (c["question_id"], c["rule"], got, exp)
        assert type(got["exact_match"]) is type(exp["vqav2_val_exact_match"])
        assert got["submission_answer"] == exp["vqav2_submission_answer"], (c["question_id"], got, exp)
        tv = V.lmms_eval_textvqa(c["prediction"], c["gt_answers"])
        assert tv["exact_match"] == exp["textvqa_val_exact_match"], (c["question_id"], tv, exp)
        assert V.vqa_accuracy(c["prediction"], c["gt_answers"], f"lmms_eval_{version}") == got["exact_match"]


def test_normalisation_quirks():
    assert V.process_punctuation("1,000 (approx)") == "1000 approx"
    assert V.normalize_answer("1,,000") == "1 000"
    assert V.process_punctuation("3.5.") == "3.5" and V.process_punctuation(".5") == ".5"
    assert V.process_punctuation("a.m.") == "am"
    assert V.process_punctuation("." * 40 + "yes") == "." * 8 + "yes"  # re.UNICODE lands in count=32
    assert V.normalize_answer("The One") == "1" and V.normalize_answer("a") == ""
    assert V.normalize_answer("one hundred") == "1 hundred" and V.normalize_answer("eleven") == "eleven"
    assert V.normalize_answer("Im") == "im"  # capitalised contraction keys never match
    assert V.EvalAIAnswerProcessor()("red,blue") == "redblue" and V.normalize_answer("red,blue") == "red blue"
    assert V.EvalAIAnswerProcessor()("it's") == "it 's"
    assert V.EvalAIAnswerProcessor()("a?b") == "ab"
    with pytest.raises(ValueError):
        V.vqa_accuracy("x", ["x"] * 10, protocol="nope")
    with pytest.raises(ValueError):
        V.textvqa_m4c("x", ["x"] * 9)


def test_closed_form_and_rounding():
    for m, acc in enumerate([0.0, 0.3, 0.6, 0.9, 1.0, 1.0]):
        gts = ["cat"] * m + ["dog"] * (10 - m)
        assert abs(V.vqa_official("cat", gts)["acc"] - acc) < 1e-12
    assert V.official_round(40.625) == 40.63 and round(40.625, 2) == 40.62  # Python 2 half-away-from-zero
    assert V.official_round(-40.625) == -40.63 and V.official_round(66.666666) == 66.67


def test_evaluate_vqa_aggregates():
    ann = [{"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is this"},
           {"question_id": 2, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
           {"question_id": 3, "answers": ["red"] * 10, "answer_type": "other", "question_type": "what color"}]
    res = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"},
           {"question_id": 3, "answer": "Red."}]
    out = V.evaluate_vqa(ann, res)  # raw answers: "Red." vs unanimous "red" -> 0
    assert out["evalQA"] == {1: 100.0, 2: 90.0, 3: 0.0}
    assert out["overall"] == V.official_round(100 * 1.9 / 3) == 63.33
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 90.0, "other": 0.0}
    assert V.evaluate_vqa(ann, res, protocol="llava")["evalQA"][3] == 100.0
    with pytest.raises(ValueError):
        V.evaluate_vqa(ann, res[:2])


def test_single_answer_accuracy():
    assert V.single_answer_accuracy("Yes.", "yes") == 1.0  # the official unanimity rule would give 0
    assert V.single_answer_accuracy("Two", "2") == 1.0
    assert V.single_answer_accuracy("the red one", "red") == 0.0
    assert V.single_answer_accuracy("left of", "left of") == 1.0
    assert V.single_answer_accuracy("no", "yes") == 0.0
