"""GenEval: one rule engine (metrics/geneval.py) for two detectors, the transformers Mask2Former + CLIP port and the
shapes world's exact detector; the generation runner's layout, seeds and resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unitok_cli
from metrics import geneval as R
from eval.geneval_hf import Mask2FormerDetector, instance_postprocess, mask_boxes, masked_crop
from shapes import world as W
from shapes.detector import Detection

COW = 19  # the label of "cow" in COCO's (and GenEval's object_names.txt) order
NAMES = [{13: "bench", COW: "cow"}.get(i, f"class{i}") for i in range(80)]


def D(shape, color, box, score=1.0):
    return Detection(shape, color, box, (0, 0), 1, score)


def by_class(dets):
    out = {}
    for d in dets:
        out.setdefault(d.shape, []).append(d)
    return out


def colors(objs, cls):
    return [o.color for o in objs]


# ---------------------------------------------------------------------------- the rules
def test_evaluate_follows_geneval_logic():
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a circle left of a square"}
    objs = {"square": [D("square", "red", (30, 0, 40, 10))], "circle": [D("circle", "blue", (0, 0, 10, 10))]}
    assert R.evaluate(objs, pos, colors) == (True, "")
    ok, reason = R.evaluate({"circle": objs["circle"]}, pos, colors)
    assert not ok and reason == "expected square>=1, found 0\nno target for circle to be left of"
    # only the most confident detection of a class is checked, and only it is classified
    col = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "x"}
    dets = [D("circle", "blue", (0, 0, 10, 10), 0.9), D("circle", "red", (20, 0, 30, 10), 0.8)]
    asked = []
    ok, reason = R.evaluate(R.keep_objects(by_class(dets), "colors", calibrated=False), col,
                            lambda objs, cls: asked.append((len(objs), cls)) or colors(objs, cls))
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 blue" and asked == [(1, "circle")]
    cnt = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
           "exclude": [{"class": "circle", "count": 3}], "prompt": "x"}
    three = dets + [D("circle", "green", (40, 0, 50, 10))]
    assert R.evaluate(R.keep_objects(by_class(dets), "counting", False), cnt, colors) == (True, "")
    assert R.evaluate(R.keep_objects(by_class(three), "counting", False), cnt, colors) == (
        False, "expected circle<3, found 3")


def test_keep_objects_thresholds_cap_and_order():
    dets = [D("circle", "red", (i, 0, i + 1, 1), s) for i, s in enumerate([0.3, 0.31, 0.95, 0.9, 0.5, 0.5])]
    kept = R.keep_objects(by_class(dets), "colors")["circle"]
    assert [d.score for d in kept] == [0.95, 0.9, 0.5, 0.5, 0.31]  # strictly > 0.3, descending
    assert [d.bbox[0] for d in kept[2:4]] == [4, 5]  # a tie keeps the detector's order
    # counting: > 0.9 for every class of the prompt
    assert [d.score for d in R.keep_objects(by_class(dets), "counting")["circle"]] == [0.95]
    assert R.keep_objects({"circle": [D("circle", "red", (0, 0, 1, 1), 0.2)]}, "colors") == {}
    # uncalibrated scores (template IoU): no threshold; 16 per class in every case
    many = [D("circle", "red", (i, 0, i + 1, 1), 0.01 * i) for i in range(20)]
    assert len(R.keep_objects(by_class(many), "colors", calibrated=False)["circle"]) == 16
    assert len(R.keep_objects(by_class([D("circle", "red", (i, 0, i + 1, 1), 0.99) for i in range(20)]),
                              "counting")["circle"]) == 16


def test_relative_position_is_the_one_rule():
    assert W.relative_position is R.relative_position
    assert R.relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert R.relative_position((1, 0, 11, 10), (0, 0, 10, 10)) == set()  # within the 0.1 x (wA + wB) margin
    assert R.relative_position((30, 30, 40, 40), (0, 0, 10, 10)) == {"right of", "below"}


def test_summary_is_mean_over_tasks():
    rows = [{"tag": "a", "prompt": "p1", "metadata": "m1", "correct": True},
            {"tag": "a", "prompt": "p1", "metadata": "m1", "correct": False},
            {"tag": "a", "prompt": "p2", "metadata": "m2", "correct": False},
            {"tag": "a", "prompt": "p2", "metadata": "m2", "correct": False},
            {"tag": "b", "prompt": "p3", "metadata": "m3", "correct": True}]
    s = R.summarize(rows)
    assert list(s["per_task"]) == ["a", "b"]
    assert s["per_task"] == {"a": 0.25, "b": 1.0} and s["overall"] == 0.625
    assert s["correct_images"] == 0.4 and s["correct_prompts"] == 2 / 3


# ---------------------------------------------------------------------------- shapes detector through the CLI
def shapes_folder(root: Path, prompts, wrong: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for i, m in enumerate(prompts):
        (root / f"{i:05d}" / "samples").mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(m))
        for j in range(2):
            scene = W.scene_for_prompt(m if i != wrong else prompts[(i + 1) % len(prompts)], rng)
            W.render(scene).save(root / f"{i:05d}" / "samples" / f"{j:04d}.png")
    return root


def test_geneval_score_cli_with_the_shapes_detector(tmp_path, capsys):
    prompts = W.geneval_prompts(2, seed=0)
    root = shapes_folder(tmp_path / "g", prompts, wrong=0)
    Image.new("RGB", (64, 64), "white").save(root / "00001" / "samples" / "grid.png")  # skipped: not \d+.png
    (root / "notes").mkdir()  # skipped: not digits
    (root / "00002" / "samples" / "0007.png").write_bytes(b"not a png")  # unreadable: named, skipped
    assert unitok_cli.main(["eval", "geneval-score", str(root), "--detector", "shapes"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(x) for x in (root / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(prompts)
    assert list(lines[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    assert [r["correct"] for r in lines] == [False, False] + [True] * (2 * len(prompts) - 2)
    assert lines[0]["reason"] and json.loads(lines[0]["metadata"]) == prompts[0]
    summary = json.loads((root / "results_summary.json").read_text())
    assert summary["overall"] == R.summarize(lines)["overall"] and summary["detector"] == "shapes detector"
    assert len(summary["unreadable"]) == 1 and "0007.png" in summary["unreadable"][0] and "0007.png" in out.err
    assert f"GenEval (shapes detector) overall {summary['overall']:.5f}" in out.out


def test_geneval_score_needs_the_model_folders(tmp_path, capsys):
    root = shapes_folder(tmp_path / "g", W.geneval_prompts(1, seed=0)[:1])
    assert unitok_cli.main(["eval", "geneval-score", str(root)]) == 2
    assert "needs --detector-path and --clip-path" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the transformers detector
def tiny_mask2former(path: Path, favour: int | None = COW) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former import Mask2FormerImageProcessor

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    names = NAMES
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=80, hidden_dim=32, num_queries=10,
                            encoder_layers=1, decoder_layers=2, feature_size=32, mask_feature_size=32,
                            dim_feedforward=32, num_attention_heads=2, encoder_feedforward_dim=32,
                            use_pretrained_backbone=False, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if favour is not None:  # every query says "cow" with probability ~1, so objects pass GenEval's 0.3
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[favour] = 20.0
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(path)
    return path


def tiny_clip(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for t in ("a photo of a object colored -", *R.COLORS, *NAMES) for w in t.split()})
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1),
                                                                                                ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return tiny_mask2former(root / "m2f"), tiny_clip(root / "clip")


def test_instance_postprocess_scores_equal_transformers_own(hf_models, tmp_path):
    """At the processor's 384 px, our mmdet-style post-processing gives the scores transformers'
    post_process_instance_segmentation gives (same formula; transformers thresholds at 0.5 and works at 384)."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    path = tiny_mask2former(tmp_path / "m", favour=None)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(path).eval()
    proc = AutoImageProcessor.from_pretrained(hf_models[0])
    proc.size = {"shortest_edge": 384, "longest_edge": 384}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8))
    inputs = proc(images=[image], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (384, 384)
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"])
    theirs = proc.post_process_instance_segmentation(out, threshold=0.0)[0]["segments_info"]
    logits = torch.nn.functional.interpolate(out.masks_queries_logits, size=(384, 384), mode="bilinear",
                                             align_corners=False)
    labels, scores, masks = instance_postprocess(out.class_queries_logits[0], logits[0], max_per_image=10)
    ours = sorted((int(lab), round(float(s), 6)) for lab, s, m in zip(labels, scores, masks) if m.any())
    assert ours == sorted((s["label_id"], s["score"]) for s in theirs) and len(ours) > 0


def test_mask_boxes_and_the_colour_crop():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:7] = True
    assert mask_boxes(masks).tolist() == [[2.0, 1.0, 7.0, 3.0], [0.0, 0.0, 0.0, 0.0]]  # exclusive end; empty -> 0
    img = Image.fromarray(np.full((6, 8, 3), (200, 10, 10), np.uint8))
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:4] = True
    crop = np.asarray(masked_crop(img, mask, (1.6, 0.6, 5.4, 3.4)))  # PIL rounds the box: (2, 1, 5, 3)
    assert crop.shape == (2, 3, 3)
    assert crop[:, :2].tolist() == [[[200, 10, 10]] * 2] * 2 and crop[:, 2].tolist() == [[153, 153, 153]] * 2


def test_transformers_detector_end_to_end(hf_models, tmp_path, capsys):
    """The whole path through the loading code on generated images: Mask2Former finds "cow" everywhere (biased
    head) with scores between GenEval's two thresholds, CLIP names colours; the rules decide."""
    m2f, clip = hf_models
    prompts = [{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
               {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
               {"tag": "counting", "include": [{"class": "cow", "count": 2}], "exclude": [{"class": "cow", "count": 3}],
                "prompt": "a photo of two cows"},
               {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}],
                "prompt": "a photo of a red cow"}]
    root = tmp_path / "g"
    for i, m in enumerate(prompts):
        (root / f"{i:05d}" / "samples").mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(m))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            root / f"{i:05d}" / "samples" / "0000.png")
    assert unitok_cli.main(["eval", "geneval-score", str(root), "--detector-path", str(m2f),
                            "--clip-path", str(clip)]) == 0
    rows = [json.loads(x) for x in (root / "results.jsonl").read_text().splitlines()]
    details = [json.loads(r["details"]) for r in rows]
    assert set(details[0]) == {"cow"} and 1 <= len(details[0]["cow"]) <= 10
    assert all(0.3 < box[4] < 0.9 and len(box) == 5 for box in details[0]["cow"])
    assert rows[0]["correct"] and rows[0]["reason"] == ""
    assert not rows[1]["correct"] and rows[1]["reason"] == "expected bench>=1, found 0"
    assert details[2] == {} and rows[2]["reason"] == "expected cow>=2, found 0"  # 0.9 for counting
    # the colour item: the top cow's CLIP colour decides, as computed here from the same models
    detector = Mask2FormerDetector(m2f, clip)
    image = Image.open(root / "00003" / "samples" / "0000.png").convert("RGB")
    top = R.keep_objects(detector.detect(image), "colors")["cow"][0]
    assert [round(v, 4) for v in top.bbox] + [round(top.score, 4)] == [round(v, 4) for v in details[3]["cow"][0]]
    colour = detector.colors(image, [top], "cow")[0]
    assert rows[3]["correct"] == (colour == "red")
    assert rows[3]["reason"] == ("" if colour == "red" else f"expected red cow>=1, found 0 red; and 1 {colour}")
    assert "GenEval (transformers detector) overall" in capsys.readouterr().out


def test_class_names_file_must_match_the_detector(hf_models, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("person\nbicycle\n")
    with pytest.raises(ValueError, match="2 class names, but the detector has 80 classes"):
        Mask2FormerDetector(hf_models[0], hf_models[1], class_names=names)


# ---------------------------------------------------------------------------- generation runner
def test_generation_layout_seeds_and_resume(tmp_path, capsys):
    from mllm_train_helpers import write_tiny_pair

    pair = write_tiny_pair(tmp_path / "pair", spread=2.0)
    meta = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
            {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}],
             "prompt": "a photo of a red cow"}]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen"
    base = ["eval", "geneval", "--model", str(pair / "mllm"), "--tokenizer", str(pair / "unitok"), "--metadata",
            str(meta), "--out", str(out), "--images-per-prompt", "3", "--cfg", "3", "--top-k", "5"]
    assert unitok_cli.main(base + ["--batch-size", "4"]) == 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [f"{i:05d}/samples/{j:04d}.png" for i in range(2) for j in range(3)]
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == rows[1]
    run = json.loads((out / "run.json").read_text())
    assert (run["cfg_scale"], run["top_k"], run["top_p"], run["temperature"], run["seed"]) == (3.0, 5, 1.0, 1.0, 0)
    first = {p: (out / p).read_bytes() for p in pngs}
    # resume: a lost image is redrawn identically in another batch size (per-image seeds); the rest are kept
    (out / "00001" / "samples" / "0001.png").unlink()
    capsys.readouterr()
    assert unitok_cli.main(base + ["--batch-size", "1"]) == 0
    assert "1 images generated, 5 already there" in capsys.readouterr().out
    assert {p: (out / p).read_bytes() for p in pngs} == first
    # other settings do not mix in
    assert unitok_cli.main(base + ["--seed", "1"]) == 2
    assert "seed 0 (now 1)" in capsys.readouterr().err
