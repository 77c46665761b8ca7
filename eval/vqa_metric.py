"""Official VQA answer normalisation and accuracy, plus the LLaVA / TextVQA / lmms-eval variants.

Rules: ``notes/eval_spec.md`` §2-§3 (sources: GT-Vision-Lab/VQA ``vqaEval.py`` @ a013f00, LLaVA
``m4c_evaluator.py`` @ c121f04, lmms-eval ``tasks/{vqav2,textvqa}/utils.py``). Every per-question value is computed
in the same floating-point order as the reference code, so the test vectors (``eval_vectors/vqa_accuracy.json``)
are reproduced bit for bit.

Protocols for one VQAv2 question (``vqa_accuracy(pred, gts, protocol=...)``):

* ``"llava"`` (default; what LLaVA/UniTok report): ``EvalAIAnswerProcessor(pred)``, then the official scorer.
* ``"official"``: the official ``vqaEval.py`` on the raw prediction (unanimity rule included).
* ``"lmms_eval_0.7"``: lmms-eval >= 0.6 ``vqav2_val``: punctuation + digit/article steps on both sides, always.
* ``"lmms_eval_0.3"``: lmms-eval 0.3: EvalAI processor, then the official unanimity + normalisation steps.

TextVQA: ``textvqa_accuracy(pred, gts, protocol="llava")`` (m4c evaluator; ``"lmms_eval"`` uses ``statistics.mean``).

The single-answer world scorer (``single_answer_accuracy``) is documented at its definition.
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

__all__ = [
    "PUNCTUATION", "CONTRACTIONS", "NUMBER_MAP", "ARTICLES",
    "process_punctuation", "process_digit_article", "clean_whitespace", "normalize_answer",
    "EvalAIAnswerProcessor", "official_round",
    "vqa_official", "llava_vqav2", "lmms_eval_vqav2", "textvqa_m4c", "lmms_eval_textvqa",
    "vqa_accuracy", "textvqa_accuracy", "evaluate_vqa", "single_answer_accuracy",
]

# 21 characters, in the official order (the apostrophe, colon and period are *not* in the list).
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                                 ">", "<", "@", "`", ",", "?", "!")

NUMBER_MAP: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES: tuple[str, ...] = ("a", "an", "the")

# The official table, verbatim (including the capitalised keys that never match after lower(), and the reversed
# "somebody'd" -> "somebodyd" entry). lmms-eval's ``vqa_eval_metric.CONTRACTIONS`` is identical.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

# The official look-behind is malformed ("(?!<=" is a look-ahead for the literal "<="), so every '.' not followed by
# a digit is removed; and re.UNICODE (=32) lands in the *count* argument of .sub(): at most 32 periods go.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)  # 32, exactly as the reference passes it
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(in_text: str, comma_re: re.Pattern) -> str:
    out_text = in_text
    comma = comma_re.search(in_text) is not None  # tested on the *original* input, as the reference does
    for p in PUNCTUATION:
        if (p + " " in in_text or " " + p in in_text) or comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, _PERIOD_COUNT)


def process_punctuation(text: str) -> str:
    """Official ``VQAEval.processPunctuation`` (comma test ``(\\d)(,)(\\d)``)."""
    return _process_punctuation(text, _COMMA_STRIP_OFFICIAL)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower, split on whitespace, number words -> digits, drop articles,
    contractions map, rejoin with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean_whitespace(text: str) -> str:
    """Official first step: ``\\n`` and ``\\t`` -> space, then ``strip()``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer (whitespace, punctuation, digits/articles/contractions).

    This is what ``vqaEval.py`` applies to both sides when the GT answers are *not* unanimous."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


class EvalAIAnswerProcessor:
    """``EvalAIAnswerProcessor`` of LLaVA ``m4c_evaluator.py`` (MMF; lmms-eval's copy is AST-identical)."""

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        return _process_punctuation(in_text, _COMMA_STRIP_EVALAI)

    def process_digit_article(self, in_text: str) -> str:
        return process_digit_article(in_text)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        return self.process_digit_article(item)


_EVALAI = EvalAIAnswerProcessor()


def official_round(x: float, ndigits: int = 2) -> float:
    """Python 2 ``round`` as used by the official scorer: half away from zero on the exact binary value
    (Python 3's ``round`` is half-to-even: 40.625 -> 40.63 here, 40.62 there)."""
    q = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(q, rounding=ROUND_HALF_UP))


# ------------------------------------------------------------------------------------------------------------------
# Per-question scorers
# ------------------------------------------------------------------------------------------------------------------

def _gt_items(gt_answers: Sequence[str | Mapping[str, Any]]) -> tuple[list[str], list[Any]]:
    """Answer strings plus an identity key per GT answer.

    The reference removes "the other 9" by dict inequality; real annotations carry distinct ``answer_id``s, so
    this is by index. For dict input the non-answer fields are the identity (two fully identical dicts would both be
    removed, exactly as in the reference); plain strings get their index."""
    answers, keys = [], []
    for i, g in enumerate(gt_answers):
        if isinstance(g, Mapping):
            answers.append(str(g["answer"]))
            keys.append(tuple(sorted((k, repr(v)) for k, v in g.items() if k != "answer")))
        else:
            answers.append(str(g))
            keys.append(i)
    return answers, keys


def _leave_one_out(answers: list[str], keys: list[Any], pred: str) -> list[float]:
    items = list(zip(answers, keys))
    accs = []
    for cur in items:
        others = [it for it in items if it != cur]
        matching = [it for it in others if it[0] == pred]
        accs.append(min(1, float(len(matching)) / 3))
    return accs


def vqa_official(prediction: str, gt_answers: Sequence[str | Mapping[str, Any]]) -> dict[str, Any]:
    """GT-Vision-Lab ``VQAEval.evaluate`` for one question (spec §2.1).

    Returns ``acc`` (unrounded, ``float(sum)/len``), ``evalQA`` (``round(100*acc, 2)`` the Python 2 way),
    ``normalisation_applied`` (False when the 10 stripped GT strings are unanimous: then nothing else is normalised),
    ``normalised_prediction`` (the fully normalised prediction, for reference; used only when applied) and
    ``gt_answers_as_compared``."""
    answers, keys = _gt_items(gt_answers)
    answers = [clean_whitespace(a) for a in answers]
    res = clean_whitespace(prediction)
    normalised_prediction = process_digit_article(process_punctuation(res))
    applied = len(set(answers)) > 1
    if applied:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        res = normalised_prediction
    gt_acc = _leave_one_out(answers, keys, res)
    acc = float(sum(gt_acc)) / len(gt_acc)
    return {"acc": acc, "evalQA": official_round(100 * acc, 2), "normalisation_applied": applied,
            "normalised_prediction": normalised_prediction, "gt_answers_as_compared": answers}


def llava_vqav2(prediction: str, gt_answers: Sequence[str | Mapping[str, Any]]) -> dict[str, Any]:
    """LLaVA/UniTok VQAv2 number (spec §2.2): ``convert_vqav2_for_submission.py`` submits
    ``EvalAIAnswerProcessor(text)``; the server scores it with the official rules."""
    submitted = _EVALAI(prediction)
    out = vqa_official(submitted, gt_answers)
    return {"submitted_answer": submitted, "acc": out["acc"], "evalQA": out["evalQA"]}


def lmms_eval_vqav2(prediction: str, gt_answers: Sequence[str | Mapping[str, Any]],
                    version: str = "0.7") -> dict[str, Any]:
    """lmms-eval ``vqav2_process_results`` (``exact_match`` and the submitted answer).

    ``version="0.7"`` (>= 0.6): both sides always get ``process_punctuation`` (EvalAI comma regex) and
    ``process_digit_article``; no ``word_tokenize``, no unanimity rule.
    ``version="0.3"``: ``EvalAIAnswerProcessor(prediction)``, then the official unanimity rule and steps."""
    answers, keys = _gt_items(gt_answers)
    answers = [clean_whitespace(a) for a in answers]
    if version.startswith("0.3"):
        res = _EVALAI(prediction)
        if len(set(answers)) > 1:
            answers = [_EVALAI.process_digit_article(_EVALAI.process_punctuation(a)) for a in answers]
            res = _EVALAI.process_digit_article(_EVALAI.process_punctuation(res))
    else:
        answers = [_EVALAI.process_digit_article(_EVALAI.process_punctuation(a)) for a in answers]
        res = _EVALAI.process_digit_article(_EVALAI.process_punctuation(prediction))
    gt_acc = _leave_one_out(answers, keys, res)
    return {"exact_match": statistics.mean(gt_acc), "submission_answer": res}


def _m4c_unique_scores(answers: list[str]) -> dict[str, float]:
    gt = list(enumerate(answers))
    scores = {}
    for unique in set(answers):
        accs = []
        for cur in gt:
            others = [it for it in gt if it != cur]
            matching = [it for it in others if it[1] == unique]
            accs.append(min(1, float(len(matching)) / 3))
        scores[unique] = sum(accs) / len(accs)
    return scores


def textvqa_m4c(prediction: str, gt_answers: Sequence[str]) -> dict[str, Any]:
    """LLaVA/UniTok ``TextVQAAccuracyEvaluator`` for one question (spec §3): EvalAI processor on the prediction and
    on all 10 GT answers (no unanimity rule); 0 when the prediction is not a GT answer."""
    pred = _EVALAI(prediction)
    answers = [_EVALAI(a) for a in gt_answers]
    if len(answers) != 10:
        raise ValueError(f"TextVQA needs exactly 10 GT answers, got {len(answers)}")
    acc = _m4c_unique_scores(answers).get(pred, 0.0)
    return {"evalai_prediction": pred, "evalai_gt_answers": answers, "acc": acc}


def lmms_eval_textvqa(prediction: str, gt_answers: Sequence[str]) -> dict[str, Any]:
    """lmms-eval ``textvqa_process_results`` (0.3 and >= 0.6 alike): EvalAI on both sides, ``statistics.mean``."""
    pred = _EVALAI(prediction)
    answers = [_EVALAI(a) for a in gt_answers]
    gt_acc = []
    for i in range(len(answers)):
        others = [answers[j] for j in range(len(answers)) if i != j]
        gt_acc.append(min(1, float(sum(1 for a in others if a == pred)) / 3))
    return {"exact_match": statistics.mean(gt_acc), "submission_answer": pred}


_VQA_PROTOCOLS = ("llava", "official", "lmms_eval_0.7", "lmms_eval_0.3")


def vqa_accuracy(prediction: str, gt_answers: Sequence[str | Mapping[str, Any]], protocol: str = "llava") -> float:
    """Per-question VQAv2 accuracy in [0, 1] under ``protocol`` (see the module docstring)."""
    if protocol == "llava":
        return llava_vqav2(prediction, gt_answers)["acc"]
    if protocol == "official":
        return vqa_official(prediction, gt_answers)["acc"]
    if protocol in ("lmms_eval_0.7", "lmms_eval_0.6", "lmms_eval"):
        return lmms_eval_vqav2(prediction, gt_answers, "0.7")["exact_match"]
    if protocol == "lmms_eval_0.3":
        return lmms_eval_vqav2(prediction, gt_answers, "0.3")["exact_match"]
    raise ValueError(f"unknown VQA protocol {protocol!r}; choose from {_VQA_PROTOCOLS}")


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str], protocol: str = "llava") -> float:
    """Per-question TextVQA accuracy: ``"llava"`` (m4c evaluator) or ``"lmms_eval"``."""
    if protocol == "llava":
        return textvqa_m4c(prediction, gt_answers)["acc"]
    if protocol == "lmms_eval":
        return lmms_eval_textvqa(prediction, gt_answers)["exact_match"]
    raise ValueError(f"unknown TextVQA protocol {protocol!r}; choose 'llava' or 'lmms_eval'")


def evaluate_vqa(annotations: Iterable[Mapping[str, Any]], results: Iterable[Mapping[str, Any]],
                 protocol: str = "official", ndigits: int = 2) -> dict[str, Any]:
    """Aggregate like ``VQAEval.evaluate`` + ``setAccuracy``.

    ``annotations``: official annotation records (``question_id, answers[10], answer_type, question_type``).
    ``results``: ``[{question_id, answer}]`` covering exactly the annotated ids. ``protocol="official"`` scores the
    answer as given (use ``"llava"`` for raw model text). Returns the unrounded ``acc`` per question plus
    ``overall`` / ``perAnswerType`` / ``perQuestionType`` (``round(100*mean)`` the official way) and ``evalQA``."""
    ann = {a["question_id"]: a for a in annotations}
    res = {r["question_id"]: r["answer"] for r in results}
    if set(ann) != set(res):
        raise ValueError("results must cover exactly the annotated question ids")
    acc_qa: list[float] = []
    per_ans: dict[str, list[float]] = {}
    per_ques: dict[str, list[float]] = {}
    acc_by_id: dict[Any, float] = {}
    for qid, a in ann.items():
        acc = vqa_accuracy(res[qid], a["answers"], protocol)
        acc_by_id[qid] = acc
        acc_qa.append(acc)
        per_ans.setdefault(a.get("answer_type", ""), []).append(acc)
        per_ques.setdefault(a.get("question_type", ""), []).append(acc)

    def agg(v: list[float]) -> float:
        return official_round(100 * float(sum(v)) / len(v), ndigits)

    return {"overall": agg(acc_qa) if acc_qa else 0.0,
            "perAnswerType": {k: agg(v) for k, v in per_ans.items()},
            "perQuestionType": {k: agg(v) for k, v in per_ques.items()},
            "evalQA": {k: official_round(100 * v, ndigits) for k, v in acc_by_id.items()},
            "acc": acc_by_id}


def single_answer_accuracy(prediction: str, answer: str) -> float:
    """Accuracy against ONE ground-truth answer (the shapes world): 1.0 or 0.0.

    Both sides go through the full official normalisation (``normalize_answer``: whitespace, punctuation, number
    words -> digits, articles, contractions) and are then compared exactly. Why not the official scorer with the GT
    repeated 10 times: 10 identical GT answers trigger the unanimity rule, which switches normalisation *off*, so
    ``"Yes."`` or ``"two"`` would score 0 against ``"yes"``/``"2"``. Normalising both sides is what the official
    scorer does for every non-unanimous question, and it equals the official score for 10 identical answers whenever
    normalisation is applied (m = 10 matches -> 1.0, else 0). The prediction is first passed through
    ``EvalAIAnswerProcessor`` as in the LLaVA submission pipeline (lower-casing, ``,``/``?`` removal), so a model is
    scored exactly as LLaVA/UniTok would submit it."""
    return float(normalize_answer(_EVALAI(prediction)) == normalize_answer(answer))
