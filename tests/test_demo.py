"""`unitok demo` at smoke size: every stage runs (tokenizer training, data, pretraining, instruction tuning,
evaluation), the table is printed, a second run reuses every cached stage, and `unitok eval shapes` scores the
result. Plus the evaluation helpers' own invariants."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import unitok_cli
from shapes import world as W
from eval.shapes.evaluate import answer, tokenizer_psnr, vqa_messages
from shapes.suite import VQA_SUFFIX
from mllm import MLLMProcessor, UniTokMLLM, UniTokMLLMConfig
from mllm.generation import TextSampling, chat
from demo.pipeline import SIZES


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_and_caches(tmp_path, capsys):
    cache = tmp_path / "demo"
    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for line in ("tokenizer PSNR", "VQA accuracy", "GenEval-style overall", "stage times", "machine: ",
                 "estimate: ", "precision: tokenizer "):
        assert line in out
    results = json.loads((cache / "results.json").read_text())
    # the machine it ran on, as printed before the first stage
    from train.common.precision import probe
    machine = results["machine"]
    assert (machine["fp32_gflops"], machine["bf16_gflops"]) == (probe().fp32_gflops, probe().bf16_gflops)
    assert machine["tokenizer_precision"] == ("bf16" if probe().bf16_native else "no")
    assert set(machine["estimate_seconds"]) == {"tokenizer", "data", "pretrain", "instruct", "eval"}
    assert f"{machine['fp32_gflops']:.0f} GFLOP/s" in out
    assert set(results["stages"]) == {"tokenizer", "data", "pretrain", "instruct", "eval"}
    assert not any(s["cached"] for s in results["stages"].values())
    assert 5 < results["psnr"] < 60
    assert results["vqa"]["n"] > 0 and 0 <= results["vqa"]["accuracy"] <= 1
    # the same questions as VQAv2-layout files through `unitok eval vqa` and the official scorer
    from eval.vqa_metric import official_round
    assert results["vqa_runner"]["overall"] == official_round(100 * results["vqa"]["accuracy"], 2)
    assert results["vqa_runner"]["perQuestionType"] == {t: official_round(100 * v, 2)
                                                        for t, v in results["vqa"]["per_type"].items()}
    assert "VQA through `unitok eval vqa`" in out
    assert set(results["geneval"]["per_task"]) == set(W.GENEVAL_TAGS)
    assert (cache / "eval" / "generations.png").is_file()
    assert (cache / "instruct" / "model" / "tokenizer_config.json").is_file()
    assert set(results["vqa_diagnostics"]) == {"paraphrase", "wrong_image", "train_scenes"}
    assert results["vqa_diagnostics"]["paraphrase"]["per_type"].keys() == results["vqa"]["per_type"].keys()
    assert set(results["geneval_chat"]["per_task"]) == set(W.GENEVAL_TAGS)
    assert 0 <= results["geneval_chat"]["drew_a_picture"] <= 1
    for line in ("VQA diagnostics", "asked in chat"):
        assert line in out
    draw = [json.loads(line) for line in open(cache / "data" / "draw.jsonl")]
    assert draw and all(d["conversations"][1]["value"] == "<image>" and len(d["codes"]) == 1 for d in draw)
    vqa_text = (cache / "data" / "vqa.jsonl").read_text()
    assert not any(t.split("{")[0] in vqa_text for t in W.PARAPHRASES.values())  # held out of training
    # instruction tuning reads the same conversations without their position questions, the rest in the same order
    train_questions = [q for s in W.generate_split("train", SIZES["smoke"].train_scenes, seed=0)
                       for q in W.questions(s, wording="varied")]
    position = {q["question"] for q in train_questions if q["type"] == "position"}

    def asked(name):
        return [t["value"].removeprefix("<image>\n").removesuffix(VQA_SUFFIX) for line in open(cache / "data" / name)
                for t in json.loads(line)["conversations"] if t["from"] == "human"]
    everything = asked("vqa.jsonl")
    assert any(q in position for q in everything)
    assert asked("vqa_without_position.jsonl") == [q for q in everything if q not in position]
    # the second run reads every existence, count and colour question of the training scenes, each a conversation
    # of its own
    for qtype in ("exists", "count", "color"):
        expected = [(q["question"], q["answer"]) for q in train_questions if q["type"] == qtype]
        records = [json.loads(line) for line in open(cache / "data" / f"{qtype}.jsonl")]
        assert expected and [(r["conversations"][0]["value"].removeprefix("<image>\n").removesuffix(VQA_SUFFIX),
                              r["conversations"][1]["value"]) for r in records] == expected
        assert all(len(r["conversations"]) == 2 and len(r["codes"]) == 1 for r in records)
    # instruction tuning: the mixture, existence, count and colour alone, the mixture at half the learning rate,
    # each from the last
    runs = [yaml.safe_load((cache / "instruct" / name / "run" / "config.yaml").read_text())
            for name in ("0-demo-instruct", "1-demo-selection", "2-demo-instruct")]
    assert [r["train"]["steps"] for r in runs] == [3, 2, 2]
    assert [r["optim"]["lr"] for r in runs] == [1e-3, 1e-3, 5e-4]
    assert [[p.rsplit("/", 1)[1] for s in r["data"]["sources"] for p in s["paths"]] for r in runs] == \
        [["vqa_without_position.jsonl", "draw.jsonl", "prompts.jsonl", "captions.jsonl"],
         ["exists.jsonl", "count.jsonl", "color.jsonl"],
         ["vqa_without_position.jsonl", "draw.jsonl", "prompts.jsonl", "captions.jsonl"]]
    assert runs[0]["model"]["pretrained"] == str(cache / "pretrain" / "model")
    assert runs[1]["model"]["pretrained"] == str(cache / "instruct" / "0-demo-instruct" / "model")
    assert runs[2]["model"]["pretrained"] == str(cache / "instruct" / "1-demo-selection" / "model")

    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(cache)]) == 0
    again = json.loads((cache / "results.json").read_text())
    assert all(s["cached"] for s in again["stages"].values())
    assert again["vqa"]["accuracy"] == results["vqa"]["accuracy"]

    rc = unitok_cli.main(["eval", "shapes", "--model", str(cache / "instruct" / "model"), "--tokenizer",
                          str(cache / "tokenizer" / "model"), "--scenes", "3", "--prompts-per-tag", "1",
                          "--out", str(tmp_path / "scores")])
    assert rc == 0
    scores = json.loads((tmp_path / "scores" / "results.json").read_text())
    assert scores["geneval"]["n_images"] == len(W.geneval_prompts(1))

    # the ablation: the default's stages come from the cache, the contrastive tokenizer is the same recipe + CLIP
    capsys.readouterr()
    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(cache), "--ablation"]) == 0
    table = capsys.readouterr().out
    rows = json.loads((cache / "ablation.json").read_text())
    assert list(rows) == ["reconstruction", "reconstruction + contrastive"]
    assert rows["reconstruction"]["psnr"] == results["psnr"] and rows["reconstruction"]["vqa"] == \
        results["vqa"]["accuracy"]
    assert all(0 <= v <= 1 for r in rows.values() for v in r["probe"]["codes"].values())

    loss = {name: yaml.safe_load((root / "tokenizer" / "run" / "config.yaml").read_text())["loss"]["clip"]
            for name, root in (("default", cache), ("contrastive", cache / "contrastive"))}
    assert loss == {"default": 0.0, "contrastive": 1.0}
    assert "| reconstruction + contrastive |" in table and "| reconstruction |" in table

    # --curves: the MLLM stages again, now exporting snapshots (which change nothing they train), each scored
    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(cache), "--curves"]) == 0
    assert "VQA learning curves" in capsys.readouterr().out
    traced = json.loads((cache / "results.json").read_text())
    assert [k for k, s in traced["stages"].items() if not s["cached"]] == ["pretrain", "instruct", "eval", "curves"]
    assert traced["vqa"]["per_type"] == results["vqa"]["per_type"]
    curves = traced["curves"]
    # pretraining 3 steps, instruction tuning 3 + 2 + 2: a snapshot at every step (10 points per run at most)
    assert [(c["run"], c["step"]) for c in curves] == [
        ("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("0-demo-instruct", 4), ("0-demo-instruct", 5),
        ("0-demo-instruct", 6), ("1-demo-selection", 7), ("1-demo-selection", 8), ("2-demo-instruct", 9),
        ("2-demo-instruct", 10)]
    assert curves[2]["model"] == str(cache / "pretrain" / "model")
    assert curves[-1]["model"] == str(cache / "instruct" / "model")
    # the last point is the final model, scored exactly as the eval stage scores it
    assert curves[-1]["test"] == {"accuracy": traced["vqa"]["accuracy"], "per_type": traced["vqa"]["per_type"]}
    assert curves[-1]["train"] == traced["vqa_diagnostics"]["train_scenes"]


class _Identity(torch.nn.Module):
    """A 'tokenizer' whose round trip is exact except for one flipped pixel value."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"image_size": 64})()

    def encode(self, x):
        return x

    def decode(self, x):
        y = x.clone()
        y[:, 0, 0, 0] = -y[:, 0, 0, 0]
        return y


def test_demo_estimate_scales_each_stage_by_its_own_workload():
    """The announced estimate: on the reference machine the full demo fits its 30-minute budget;
    a machine whose tokenizer steps take 3x as long and MLLM steps 2x (an AVX2-only CPU in fp32) gets exactly those
    factors on the tokenizer and data stages, and on the MLLM stages."""
    from demo.pipeline import BUDGET_MINUTES, REFERENCE_STEP_SECONDS, STAGE_OVERHEAD_SECONDS, estimate_seconds

    stages = ["tokenizer", "data", "pretrain", "instruct", "eval"]
    for precision in ("bf16", "no"):
        ref = {"tokenizer": REFERENCE_STEP_SECONDS["tokenizer"][precision], "mllm": REFERENCE_STEP_SECONDS["mllm"]}
        here = estimate_seconds(SIZES["full"], ref, precision, stages)
        if precision == "bf16":  # what the reference machine runs
            assert sum(here.values()) < BUDGET_MINUTES * 60
        slow = estimate_seconds(SIZES["full"], {"tokenizer": 3 * ref["tokenizer"], "mllm": 2 * ref["mllm"]},
                                precision, stages)
        for stage, factor in (("tokenizer", 3), ("data", 3), ("pretrain", 2), ("instruct", 2), ("eval", 2)):
            assert slow[stage] == pytest.approx(factor * here[stage])
    # the smoke size is seconds of work plus each stage's fixed costs
    smoke = estimate_seconds(SIZES["smoke"], ref, "no", stages)
    assert 5 * STAGE_OVERHEAD_SECONDS < sum(smoke.values()) < 30


@pytest.mark.slow
def test_demo_mllm_stages_can_use_bf16_autocast(tmp_path, monkeypatch):
    """The demo runs every stage in one process: an MLLM recipe with its own precision (bf16 autocast) must not
    collide with the state the tokenizer stage left in accelerate, nor a later fp32 run with the bf16 state.
    (tests/test_precision.py checks the same switch on accelerators alone, on every CPU.)"""
    from train.common.precision import probe
    from train.mllm.config import MLLMTrainConfig

    if not probe().bf16_native:  # emulated bf16 would cost ~2 minutes here for what the cheap test covers
        pytest.skip(f"this CPU emulates bf16 ({probe().describe()})")

    load = MLLMTrainConfig.load.__func__
    seen = []

    def load_bf16(cls, path, overrides=None):
        cfg = load(cls, path, [*(overrides or []), "train.mixed_precision=bf16"])
        seen.append(cfg.train.mixed_precision)
        return cfg

    monkeypatch.setattr(MLLMTrainConfig, "load", classmethod(load_bf16))
    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(tmp_path / "demo")]) == 0
    assert "bf16" in seen
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["vqa"]["n"] > 0
    monkeypatch.undo()  # and a later fp32 run in this process (its tokenizer stage first) is not held to bf16
    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(tmp_path / "again")]) == 0


def test_tokenizer_psnr_matches_the_definition():
    scenes = W.generate_split("test", 2, seed=0)
    x = torch.from_numpy(W.render_array(scenes[0], 64)).float() / 255
    err = (x[0, 0, 0] - (1 - x[0, 0, 0])) ** 2  # channel 0 of pixel (0, 0) mirrored around 0.5
    expected = float(-10 * torch.log10(err / (3 * 64 * 64)))
    assert abs(tokenizer_psnr(_Identity(), scenes[:1]) - expected) < 1e-3


def test_batched_answers_equal_one_by_one_chat():
    """Left-padded batched VQA decoding gives exactly the unbatched replies."""
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 64

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            ids = [5 + (sum(map(ord, w)) % 50) for w in text.split()]
            return type("E", (), {"input_ids": ids, "offset_mapping": [(0, 0)] * len(ids)})()

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids if i > 2)

    cfg = UniTokMLLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_codebooks=2, codebook_size=8,
                           code_dim=4, projection_dim=16, projection_heads=2, depth_layers=1, image_positions=4,
                           pad_token_id=0)
    torch.manual_seed(0)
    model = UniTokMLLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    proc = MLLMProcessor(Tok(), cfg)
    questions = ["what colour", "how many objects are there here", "is it", "what shape is the red one"]
    codes = torch.randint(0, 8, (4, 2, 4))
    batched = answer(model, proc, codes, questions, batch_size=4, max_new_tokens=3)
    single = [chat(model, proc, vqa_messages(q), codes[i:i + 1], TextSampling(max_new_tokens=3))
              for i, q in enumerate(questions)]
    assert batched == single


def test_stage_keys_ignore_comments_but_not_values(tmp_path):
    """A stage is retrained when what its config or source says changes, not when a comment is edited."""
    from demo.pipeline import _digest

    config, source = tmp_path / "demo.yaml", tmp_path / "world.py"
    config.write_text("optim:\n  lr: 4.0e-4  # a comment\n")
    source.write_text("X = 1  # a comment\n")
    before = _digest(config), _digest(source)
    config.write_text("# a new comment\noptim:\n  lr: 4.0e-4   # a comment,\n             # re-wrapped\n")
    source.write_text("# a new comment\nX = 1\n")
    assert (_digest(config), _digest(source)) == before
    config.write_text("optim:\n  lr: 5.0e-4\n")
    source.write_text("X = 2\n")
    assert _digest(config) != before[0] and _digest(source) != before[1]


def test_builder_keys_ignore_comments_but_not_code(tmp_path, monkeypatch):
    """The data stage's key digests its builder's code: a comment edit there must not retrain data and pretraining."""
    import importlib

    from demo.pipeline import _source_digest

    monkeypatch.syspath_prepend(str(tmp_path))
    versions = {"a": "def build(x):\n    return x + 1  # why\n",
                "b": "def build(x):\n    # a new comment\n    return x + 1  # why,\n    # re-wrapped\n",
                "c": "def build(x):\n    return x + 2\n"}
    digests = {}
    for name, code in versions.items():
        (tmp_path / f"builder_{name}.py").write_text(code)
        digests[name] = _source_digest(importlib.import_module(f"builder_{name}").build)
    assert digests["a"] == digests["b"] != digests["c"]


def test_stage_times_legend_only_when_a_stage_is_cached():
    """The "* cached" legend explains a star; a run that trained every stage has no star and no legend."""
    from demo.pipeline import format_stage_times

    fresh = {"tokenizer": {"seconds": 548.2, "cached": False}, "eval": {"seconds": 41.0, "cached": False}}
    assert format_stage_times(fresh) == "stage times (s):  tokenizer 548  eval 41"
    cached = {"tokenizer": {"seconds": 548.2, "cached": True}, "eval": {"seconds": 41.0, "cached": False}}
    assert format_stage_times(cached) == ("stage times (s):  tokenizer 548*  eval 41   (* cached from an earlier run)")


@pytest.mark.slow
def test_the_workload_probe_times_both_models_and_leaves_the_random_state_alone():
    """The estimate's probe runs the tokenizer stage's own trainer and the demo MLLM on the prompt -> image mix, and
    restores torch's, numpy's and Python's random state, so the stages after it are what they would have been."""
    import random

    import numpy as np

    from demo.pipeline import mllm_probe_batch, workload_step_seconds
    from mllm import UniTokMLLMConfig

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    steps = workload_step_seconds("no")
    assert set(steps) == {"tokenizer", "mllm"} and all(0 < v < 60 for v in steps.values())
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    cfg = UniTokMLLMConfig.from_preset("tiny")
    ids, labels, codes = mllm_probe_batch(cfg)
    per_row = 256 // (24 + cfg.image_positions + 4)
    assert ids.shape == (16, 256) and codes.shape == (16 * per_row, cfg.num_codebooks, cfg.image_positions)
    assert int((labels == cfg.image_placeholder_id).sum()) == codes.shape[0] * cfg.image_positions  # image targets
