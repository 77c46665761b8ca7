"""`unitok eval vqa`: LLaVA-layout benchmark folders in, LLaVA answer files, official scores and submission files
out. Batched answers equal one-at-a-time answers, a rerun resumes, two accelerate processes give the merged answers
of one, and a missing image is counted, never fatal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unitok_cli
from eval.scorers import textvqa_question
from mllm_train_helpers import REPO, write_tiny_pair

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_tiny_pair(tmp_path_factory.mktemp("runner"), spread=2.0)


def picture(path: Path, seed: int, size=(80, 60)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.name


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pope_folder(root: Path) -> Path:
    """3 categories x 3 questions on 4 images; question 8's image is missing."""
    questions, labels = [], {}
    for i in range(9):
        cat = ("adversarial", "popular", "random")[i // 3]
        image = f"COCO_val2014_{i % 4:012d}.jpg" if i != 8 else "COCO_val2014_missing.jpg"
        if i < 4:
            picture(root / "val2014" / image, i)
        questions.append({"question_id": i, "image": image, "text": f"Is there a circle in the image?{SUFFIX}",
                          "category": cat})
        labels.setdefault(cat, []).append({"question_id": i, "image": image, "text": "Is there a circle?",
                                           "label": "yes" if i % 2 else "no"})
    write_jsonl(root / "llava_pope_test.jsonl", questions)
    for cat, rows in labels.items():
        write_jsonl(root / "coco" / f"coco_pope_{cat}.json", rows)
    return root


def evaluate(pair, benchmark: str, data: Path, out: Path, *extra: str) -> dict:
    assert unitok_cli.main(["eval", "vqa", "--benchmark", benchmark, "--model", str(pair / "mllm"), "--tokenizer",
                            str(pair / "unitok"), "--data", str(data), "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def merged(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "answers" / "merge.jsonl")]


def test_pope_answers_scores_and_a_missing_image(pair, tmp_path):
    data = pope_folder(tmp_path / "pope")
    results = evaluate(pair, "pope", data, tmp_path / "out", "--batch-size", "4")
    rows = merged(tmp_path / "out")
    assert [r["question_id"] for r in rows] == list(range(9))  # question-file order
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["prompt"].endswith(SUFFIX) and rows[0]["model_id"] == "mllm"
    assert results["image_errors"] == 1 and rows[8]["text"] == "" and "no image at" in rows[8]["metadata"][
        "image_error"]
    assert set(results["scores"]["per_category"]) == {"adversarial", "popular", "random"}
    from eval.scorers import score_pope

    expected = score_pope(rows, [json.loads(line) for line in open(data / "llava_pope_test.jsonl")], data / "coco")
    assert results["scores"] == json.loads(json.dumps(expected))
    assert "POPE mean F1" in (tmp_path / "out" / "results.md").read_text()


def test_batched_answers_equal_one_at_a_time_and_a_rerun_resumes(pair, tmp_path):
    data = pope_folder(tmp_path / "pope")
    one = evaluate(pair, "pope", data, tmp_path / "one", "--batch-size", "1", "--limit", "6")
    many = evaluate(pair, "pope", data, tmp_path / "many", "--batch-size", "6", "--limit", "6")
    texts = [r["text"] for r in merged(tmp_path / "one")]
    assert texts == [r["text"] for r in merged(tmp_path / "many")] and any(texts)
    assert one["generated_this_run"] == many["generated_this_run"] == 6

    shard_file = next((tmp_path / "many" / "answers").glob("rank-*.jsonl"))
    lines = shard_file.read_text().splitlines(keepends=True)
    shard_file.write_text("".join(lines[:4]) + lines[4][:20])  # a crash mid-write: the 5th line is cut short
    again = evaluate(pair, "pope", data, tmp_path / "many", "--batch-size", "6", "--limit", "6")
    assert again["generated_this_run"] == 2  # only the lost answers
    assert [r["text"] for r in merged(tmp_path / "many")] == texts


def test_answers_of_another_run_are_never_mixed_in(pair, tmp_path, capsys):
    data = pope_folder(tmp_path / "pope")
    evaluate(pair, "pope", data, tmp_path / "out", "--limit", "3")
    args = ["eval", "vqa", "--benchmark", "pope", "--model", str(pair / "mllm"), "--tokenizer", str(pair / "unitok"),
            "--data", str(data), "--out", str(tmp_path / "out"), "--limit", "3", "--max-new-tokens", "5"]
    before = (tmp_path / "out" / "answers" / "merge.jsonl").read_text()
    assert unitok_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds the outputs of another run: max_new_tokens 128 (now 5)" in err and "--overwrite" in err
    assert (tmp_path / "out" / "answers" / "merge.jsonl").read_text() == before  # nothing touched
    assert unitok_cli.main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["generated_this_run"] == 3


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_slow_rank_does_not_take_the_fresh_run_json_for_another_run(tmp_path, monkeypatch, overwrite):
    """Two ranks claim a fresh --out; rank 1 is slow between finding no run.json and listing the outputs, long enough
    for rank 0 to write run.json (rank 1 then took it for another run's output and exited 2). Both must go on."""
    import threading
    import time
    from types import SimpleNamespace

    import tokenizer.checkpoint
    from eval.vqa_runner import claim_run_on_every_rank

    real_claim_output = tokenizer.checkpoint.claim_output

    rank1_between_checks = threading.Event()

    def claim_output_at_the_worst_time(*args, remove=True, **kwargs):
        if threading.current_thread().name == "rank 1":  # it has found no run.json; it lists the outputs late
            rank1_between_checks.set()
            time.sleep(0.3)
        elif remove:  # rank 0 writes run.json only once rank 1 is between its two checks
            rank1_between_checks.wait(5)
        return real_claim_output(*args, remove=remove, **kwargs)

    monkeypatch.setattr(tokenizer.checkpoint, "claim_output", claim_output_at_the_worst_time)
    barrier = threading.Barrier(2, timeout=20)
    run = {"benchmark": "pope", "max_new_tokens": 128}
    errors = []

    def rank(index: int) -> None:
        state = SimpleNamespace(is_main_process=index == 0, wait_for_everyone=barrier.wait)
        try:
            claim_run_on_every_rank(tmp_path / "out", run, overwrite, state)
        except Exception as e:  # noqa: BLE001 - the test reports what each rank raised
            errors.append(f"rank {index}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(i,), name=f"rank {i}") for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == run


@pytest.mark.slow
def test_two_accelerate_processes_merge_to_the_single_process_answers(pair, tmp_path):
    data = pope_folder(tmp_path / "pope")
    evaluate(pair, "pope", data, tmp_path / "single")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "unitok_cli", "eval", "vqa",
           "--benchmark", "pope", "--model", str(pair / "mllm"), "--tokenizer", str(pair / "unitok"), "--data",
           str(data), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "answers").glob("rank-*.jsonl")) == [
        "rank-00000.jsonl", "rank-00001.jsonl"]
    assert [(r["question_id"], r["text"]) for r in merged(tmp_path / "two")] == [
        (r["question_id"], r["text"]) for r in merged(tmp_path / "single")]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["scores"] == json.loads(
        (tmp_path / "single" / "results.json").read_text())["scores"]


def test_mme_ground_truth_files_and_scores(pair, tmp_path):
    data = tmp_path / "MME"
    root = data / "MME_Benchmark_release_version"
    questions = []
    for task, nested in (("existence", True), ("count", False)):
        for k in range(2):
            name = f"{k:03d}"
            picture(root / task / ("images" if nested else "") / f"{name}.png", k)
            qa = root / task / ("questions_answers_YN" if nested else "") / f"{name}.txt"
            qa.parent.mkdir(parents=True, exist_ok=True)
            spaces = "  " if task == "count" else " "  # some MME files have two spaces before the instruction
            qa.write_text(f"Is there a circle?{spaces}Please answer yes or no.\tYes\n"
                          f"Is there a square?{spaces}Please answer yes or no.\tNo\n")
            for q in ("Is there a circle?", "Is there a square?"):
                questions.append({"question_id": f"{task}/{name}.png", "image": f"{task}/{'images/' if nested else ''}"
                                  f"{name}.png", "text": q + SUFFIX, "category": task})
    write_jsonl(data / "llava_mme.jsonl", questions)
    results = evaluate(pair, "mme", data, tmp_path / "out")
    lines = (tmp_path / "out" / "mme" / "count.txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].split("\t")[:3] == ["000.txt", "Is there a circle?  Please answer yes or no.",
                                                            "Yes"]
    assert set(results["scores"]["tasks"]) == {"existence", "count"}
    assert results["scores"]["perception"] == sum(v["score"] for v in results["scores"]["tasks"].values())


def test_gqa_vqav2_and_textvqa_files(pair, tmp_path):
    gqa = tmp_path / "gqa"
    write_jsonl(gqa / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": f"20{i}", "image": picture(gqa / "data" / "images" / f"n{i}.jpg", i), "text": "What is it?"
         + SUFFIX} for i in range(3)])
    results = evaluate(pair, "gqa", gqa, tmp_path / "gqa-out")
    predictions = json.loads((tmp_path / "gqa-out" / "testdev_balanced_predictions.json").read_text())
    assert [p["questionId"] for p in predictions] == ["200", "201", "202"] and results["scores"] is None
    official = {p["questionId"]: {"answer": p["prediction"] if i else "nothing", "isBalanced": True,
                                  "types": {"structural": "query"}} for i, p in enumerate(predictions)}
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(official))
    scored = evaluate(pair, "gqa", gqa, tmp_path / "gqa-out")
    assert scored["generated_this_run"] == 0 and abs(scored["scores"]["all"] - 200 / 3) < 1e-9

    vqa = tmp_path / "vqav2"
    test_dev = [{"question_id": i, "image": picture(vqa / "test2015" / f"t{i}.jpg", i), "text": "What?" + SUFFIX}
                for i in range(2)]
    write_jsonl(vqa / "llava_vqav2_mscoco_test-dev2015.jsonl", test_dev)
    write_jsonl(vqa / "llava_vqav2_mscoco_test2015.jsonl", test_dev + [{"question_id": 9, "image": "x.jpg",
                                                                         "text": "?"}])
    results = evaluate(pair, "vqav2", vqa, tmp_path / "vqa-out")
    upload = json.loads(Path(results["files"]["evalai_upload"]).read_text())
    from eval.vqa_metric import EvalAIAnswerProcessor

    texts = [r["text"] for r in merged(tmp_path / "vqa-out")]
    assert upload == [{"question_id": 0, "answer": EvalAIAnswerProcessor()(texts[0])},
                      {"question_id": 1, "answer": EvalAIAnswerProcessor()(texts[1])}, {"question_id": 9, "answer": ""}]

    text = tmp_path / "textvqa"
    prompt = "what is written?\nReference OCR token: stop, sign" + SUFFIX
    write_jsonl(text / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "abc", "image": picture(text / "train_images" / "abc.jpg", 0), "text": prompt}])
    evaluate(pair, "textvqa", text, tmp_path / "text-out")  # answers, no annotations yet
    answer = merged(tmp_path / "text-out")[0]["text"]
    (text / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"image_id": "abc", "question": "What is written?", "question_id": 7, "answers": [answer or "x"] * 10}]}))
    assert evaluate(pair, "textvqa", text, tmp_path / "text-out")["scores"]["overall"] == (100.0 if answer else 0.0)


def test_textvqa_question_is_read_back_as_llava_does():
    assert textvqa_question("What is it?\nReference OCR token: a, b\nAnswer briefly.") == "what is it?"
    assert textvqa_question("Reference OCR token: a\nWhat is it?\nAnswer briefly.") == "what is it?"
    assert textvqa_question("What is it?\nAnswer briefly.") == "what is it?"
    assert textvqa_question("OCR tokens: a b Question: Why? Short answer:") == "why?"
    with pytest.raises(ValueError, match="none of LLaVA's layouts"):
        textvqa_question("one line")


def test_bad_inputs_are_one_line_errors(pair, tmp_path, capsys):
    code = unitok_cli.main(["eval", "vqa", "--benchmark", "pope", "--model", str(pair / "mllm"), "--tokenizer",
                            str(pair / "unitok"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no pope question file at" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "llava_pope_test.jsonl").write_text('{"question_id": 1}\n{bad\n')
    code = unitok_cli.main(["eval", "vqa", "--benchmark", "pope", "--model", str(pair / "mllm"), "--tokenizer",
                            str(pair / "unitok"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "llava_pope_test.jsonl line 2: invalid JSON" in capsys.readouterr().err


def test_shapes_exports_score_as_the_shapes_world_does(pair, tmp_path):
    """The shapes world's test scenes in the official layouts: each runner + official scorer gives the figure the
    shapes scoring gives on the same answers. Half the answers are written beforehand with the ground truth (the
    runner resumes and answers the rest), so the figures are neither 0 nor 100."""
    from eval.scorers import mme_answer, pope_scores
    from eval.shapes import export
    from shapes.suite import test_scenes
    from eval.vqa_metric import official_round, single_answer_accuracy

    counts = export.export(tmp_path / "x", test_scenes(6))
    truth = {}
    for r in json.loads((tmp_path / "x" / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]:
        truth[r["question_id"]] = r["multiple_choice_answer"]

    def run(bench, *extra):
        data, out = tmp_path / "x" / bench, tmp_path / f"{bench}-out"
        questions = [json.loads(line) for line in open(next(data.glob("llava_*.jsonl")) if bench != "vqav2" else
                                                       data / "llava_vqav2_mscoco_test-dev2015.jsonl")]
        oracle = [{"question_id": q["question_id"], "prompt": q["text"], "metadata": {},
                   "text": truth[int(q["question_id"])] if bench != "mme" else "Yes"} for q in questions[::2]]
        evaluate(pair, bench, data, out, "--max-new-tokens", "4", "--limit", "0", *extra)  # claims the folder
        write_jsonl(out / "answers" / "rank-00000.jsonl", oracle)
        results = evaluate(pair, bench, data, out, "--max-new-tokens", "4", *extra)
        assert results["answered"] == len(questions) == counts[bench]
        assert results["generated_this_run"] == len(questions) - len(oracle)
        return results, merged(out)

    results, rows = run("vqav2", "--annotations", str(tmp_path / "x" / "vqav2" / "v2_mscoco_val2014_annotations.json"))
    direct = [single_answer_accuracy(r["text"], truth[r["question_id"]]) for r in rows]
    assert 0 < sum(direct) < len(direct)
    assert results["scores"]["overall"] == official_round(100 * sum(direct) / len(direct), 2)

    results, rows = run("gqa")
    direct = [r["text"].rstrip(".").lower() == truth[int(r["question_id"])] for r in rows]
    assert abs(results["scores"]["all"] - 100 * sum(direct) / len(direct)) < 1e-9 and 0 < sum(direct) < len(direct)

    results, rows = run("pope")
    expected = pope_scores([r["text"] for r in rows], [truth[r["question_id"]] for r in rows])
    assert results["scores"]["per_category"]["random"] == expected

    results, rows = run("mme")
    scene_truth = {}
    for task in ("existence", "position"):
        for txt in (tmp_path / "x" / "mme" / "MME_Benchmark_release_version" / task).glob("*.txt"):
            for line in txt.read_text().splitlines():
                question, answer = line.split("\t")
                scene_truth[(task, txt.stem, question.replace(" Please answer yes or no.", ""))] = answer.lower()
    for task, scores in results["scores"]["tasks"].items():
        mine = [r for r in rows if r["question_id"].startswith(task + "/")]
        right = [mme_answer(r["text"].lower()) == scene_truth[(task, r["question_id"].split("/")[1][:-4],
                                                               r["prompt"].split(" Answer the")[0])] for r in mine]
        assert abs(scores["acc"] - 100 * sum(right) / len(right)) < 1e-9


def test_shapes_geneval_export_through_the_runners(pair, tmp_path, capsys):
    """GenEval end to end on files: the exported metadata -> ``eval geneval`` -> ``eval geneval-score --detector
    shapes`` gives the images and verdicts ``unitok eval shapes`` (evaluate_generation) gives; half the samples
    replaced by renders of what their prompt asks are then scored correct, so the figure is neither 0 nor 1."""
    from metrics.geneval import summarize
    from eval.shapes import export
    from shapes import world as W
    from eval.shapes.evaluate import evaluate_generation
    from shapes.suite import test_scenes
    from mllm.cli import load_mllm, load_unitok
    from mllm.generation import ImageSampling

    prompts = W.geneval_prompts(1)
    assert export.export(tmp_path / "x", test_scenes(2), prompts)["geneval"] == len(prompts)
    gen = tmp_path / "gen"
    assert unitok_cli.main(["eval", "geneval", "--model", str(pair / "mllm"), "--tokenizer", str(pair / "unitok"),
                            "--metadata", str(tmp_path / "x" / "geneval" / "evaluation_metadata.jsonl"),
                            "--out", str(gen), "--cfg", "3", "--images-per-prompt", "2", "--batch-size", "16"]) == 0
    model, processor = load_mllm(str(pair / "mllm"), "cpu")
    unitok = load_unitok(str(pair / "unitok"), model, model.device)
    direct = evaluate_generation(model, processor, unitok, prompts, 2, ImageSampling(cfg_scale=3.0, temperature=1.0),
                                 seed=0, out_dir=tmp_path / "direct")
    pngs = sorted(p.relative_to(gen) for p in gen.rglob("*.png"))
    assert len(pngs) == 2 * len(prompts)
    assert all((gen / p).read_bytes() == (tmp_path / "direct" / p).read_bytes() for p in pngs)
    assert unitok_cli.main(["eval", "geneval-score", str(gen), "--detector", "shapes"]) == 0
    rows = [json.loads(line) for line in (gen / "results.jsonl").read_text().splitlines()]
    assert [(r["correct"], r["reason"]) for r in rows] == [(r["correct"], r["reason"]) for r in direct["results"]]
    rng = np.random.default_rng(0)
    for i, m in enumerate(prompts):
        W.render(W.scene_for_prompt(m, rng)).save(gen / f"{i:05d}" / "samples" / "0000.png")
    assert unitok_cli.main(["eval", "geneval-score", str(gen), "--detector", "shapes"]) == 0
    rows = [json.loads(line) for line in (gen / "results.jsonl").read_text().splitlines()]
    assert all(r["correct"] for r in rows if r["filename"].endswith("0000.png"))
    summary = json.loads((gen / "results_summary.json").read_text())
    assert summary["overall"] == summarize(rows)["overall"] and 0 < summary["overall"] < 1


@pytest.mark.parametrize("room", ["over max_length", "no room to answer"])
def test_an_over_long_question_is_recorded_not_fatal(pair, tmp_path, room):
    """A prompt longer than the processor takes, or one that leaves no room for the answer in the model's context,
    is answered "", counted and named; the other questions of its batch are answered as they would be without it."""
    from mllm.cli import load_mllm

    model, processor = load_mllm(str(pair / "mllm"), "cpu")
    context = model.config.max_position_embeddings
    data = pope_folder(tmp_path / "pope")
    rows = [json.loads(line) for line in open(data / "llava_pope_test.jsonl")]
    repeat = 2000
    if room == "no room to answer":  # fits the context, but not with the 128 new tokens
        repeat = next(k for k in range(1, 2000) if len(processor.chat_prompt(
            [{"role": "user", "content": "<image>\n" + "Is there a circle " * k + SUFFIX}])) > context - 128)
    rows[1]["text"] = "Is there a circle " * repeat + SUFFIX
    assert room == "over max_length" or len(processor.chat_prompt(
        [{"role": "user", "content": "<image>\n" + rows[1]["text"]}])) <= context
    write_jsonl(data / "llava_pope_test.jsonl", rows)
    results = evaluate(pair, "pope", data, tmp_path / "out", "--batch-size", "4", "--limit", "4")
    got = merged(tmp_path / "out")
    assert results["prompt_errors"] == 1 and got[1]["text"] == ""
    why = "more than max_length" if room == "over max_length" else f"exceeds the model's context of {context}"
    assert why in got[1]["metadata"]["prompt_error"]
    rows[1]["text"] = rows[0]["text"]
    write_jsonl(data / "llava_pope_test.jsonl", rows)
    clean = evaluate(pair, "pope", data, tmp_path / "clean", "--batch-size", "4", "--limit", "4")
    assert [r["text"] for i, r in enumerate(merged(tmp_path / "clean")) if i != 1] == \
        [r["text"] for i, r in enumerate(got) if i != 1] and clean["prompt_errors"] == 0
