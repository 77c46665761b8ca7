"""Shapes world: deterministic generator, disjoint splits, exact detector, GenEval-rule scorer, VQA scorer."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from metrics.geneval import COLORS
from eval.geneval_generate import write_prompt_folder
from shapes import geneval as G
from shapes import world as W
from shapes.detector import detect
from eval.shapes.vqa import score_vqa
from eval.vqa_metric import normalize_answer

# ------------------------------------------------------------------------------------------------------------------
# helpers


def _img_digest(scene, size=None) -> str:
    return hashlib.sha256(W.render(scene, size).tobytes()).hexdigest()


def _texts(scene):
    return W.captions(scene), W.questions(scene), W.t2i_prompts(scene)


def _gt_set(scene):
    return sorted((o.shape, o.color, o.box) for o in scene.objects)


def _det_set(dets):
    return sorted((d.shape, d.color, tuple(int(v) for v in d.bbox)) for d in dets)


@pytest.fixture(scope="module")
def train_scenes():
    return W.generate_split("train", 300, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# generator


def test_generator_is_deterministic():
    a = W.generate_split("train", 40, seed=7)
    b = W.generate_split("train", 40, seed=7)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [_img_digest(s) for s in a] == [_img_digest(s) for s in b]
    assert [_texts(s) for s in a] == [_texts(s) for s in b]
    # a fresh generator object gives the same scene from the same seed
    r1, r2 = np.random.default_rng(123), np.random.default_rng(123)
    assert W.make_scene(r1) == W.make_scene(r2)
    c = W.generate_split("train", 40, seed=8)
    assert [s.to_dict() for s in a] != [s.to_dict() for s in c]
    # scene_for_prompt is deterministic too
    m = W.enumerate_prompts("color_attr")[17]
    s1 = W.scene_for_prompt(m, np.random.default_rng(5))
    s2 = W.scene_for_prompt(m, np.random.default_rng(5))
    assert s1 == s2 and _img_digest(s1) == _img_digest(s2)


def test_splits_never_overlap():
    splits = {name: W.generate_split(name, n, seed=0) for name, n in (("train", 1500), ("validation", 300),
                                                                        ("test", 300))}
    splits["test_seed1"] = W.generate_split("test", 300, seed=1)
    keys = {name: {W.layout_key(s.objects) for s in scenes} for name, scenes in splits.items()}
    for name, scenes in splits.items():
        assert len(keys[name]) == len(scenes), f"duplicate layouts in {name}"
        split = name.split("_")[0]
        assert all(W.scene_split(s) == split for s in scenes)
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & (keys["test"] | keys["test_seed1"])
    assert not keys["validation"] & (keys["test"] | keys["test_seed1"])
    with pytest.raises(ValueError):
        W.generate_split("dev", 1)


def test_scene_invariants(train_scenes):
    n_obj = set()
    for s in train_scenes:
        objs = s.objects
        n_obj.add(len(objs))
        assert 1 <= len(objs) <= 4
        assert len({(o.color, o.shape) for o in objs}) == len(objs)  # referring expressions are unique
        for i, a in enumerate(objs):
            x1, y1, x2, y2 = a.box
            assert 0 <= x1 and 0 <= y1 and x2 <= 64 and y2 <= 64
            for b in objs[i + 1:]:
                bx1, by1, bx2, by2 = b.box
                assert x2 + 2 <= bx1 or bx2 + 2 <= x1 or y2 + 2 <= by1 or by2 + 2 <= y1  # >= 2 px apart
        assert W.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert n_obj == {1, 2, 3, 4}
    img = W.render(train_scenes[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    # every palette colour is far from every background tone (segmentation stays exact)
    for c in W.COLORS.values():
        for t in W.BACKGROUND_TONES:
            assert np.linalg.norm(np.subtract(c, t)) > 150


def test_vocabulary_and_prompt_style():
    assert W.SHAPES == ("circle", "square", "triangle", "diamond", "cross")
    assert set(W.COLORS) <= set(COLORS)
    assert W.make_plural("cross") == "crosses" and W.make_plural("circle") == "circles"
    assert W.with_article("orange square") == "an orange square"
    suite = W.geneval_prompts(n_per_tag=100, seed=43)
    assert [m["tag"] for m in suite[:5]] == ["single_object"] * 5
    assert {m["tag"] for m in suite} == set(W.GENEVAL_TAGS)
    assert len({json.dumps(m, sort_keys=True) for m in suite}) == len(suite)
    assert suite == W.geneval_prompts(n_per_tag=100, seed=43)
    for m in suite:
        assert list(m)[0] == "tag" and list(m)[-1] == "prompt" and m["prompt"].startswith("a photo of ")
        for it in m["include"]:
            assert set(it) <= {"class", "count", "color", "position"} and it["class"] in W.SHAPES
        if m["tag"] == "counting":
            n = m["include"][0]["count"]
            assert 2 <= n <= 4 and m["exclude"] == [{"class": m["include"][0]["class"], "count": n + 1}]
            assert m["prompt"] == f"a photo of {W.NUMBER_WORDS[n]} {W.make_plural(m['include'][0]['class'])}"
        if m["tag"] == "position":
            b, a = m["include"]
            assert a["position"][1] == 0 and a["position"][0] in W.RELATIONS
            assert m["prompt"] == f"a photo of {W.with_article(a['class'])} {a['position'][0]} " \
                                  f"{W.with_article(b['class'])}"
        if m["tag"] == "color_attr":
            assert m["include"][0]["color"] != m["include"][1]["color"]
    assert sum(len(W.enumerate_prompts(t)) for t in W.GENEVAL_TAGS) == 5 + 20 + 15 + 30 + 80 + 600


def test_prompt_schema_matches_geneval_metadata():
    from conftest import fixture_dir
    path = fixture_dir("eval_data", "geneval") / "evaluation_metadata.jsonl"
    ref = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ref_shapes = {(m["tag"], tuple(m), tuple(tuple(sorted(i)) for i in m["include"]),
                   tuple(tuple(sorted(i)) for i in m.get("exclude", []))) for m in ref}
    ours = [m for t in W.GENEVAL_TAGS for m in W.enumerate_prompts(t)]
    our_shapes = {(m["tag"], tuple(m), tuple(tuple(sorted(i)) for i in m["include"]),
                   tuple(tuple(sorted(i)) for i in m.get("exclude", []))) for m in ours}
    assert our_shapes <= ref_shapes  # same keys, key order and item structure per tag as GenEval's file
    # same phrasing templates: the prompt is rebuilt from the metadata the way GenEval's create_prompts.py does
    for m in ref:
        inc = m["include"]
        if m["tag"] == "two_object":
            assert m["prompt"] == W._prompt_two(inc[0]["class"], inc[1]["class"])["prompt"]
        if m["tag"] == "color_attr":
            assert m["prompt"] == W._prompt_color_attr(inc[0]["class"], inc[0]["color"], inc[1]["class"],
                                                       inc[1]["color"])["prompt"]
        if m["tag"] == "position":
            assert m == W._prompt_position(inc[1]["class"], inc[1]["position"][0], inc[0]["class"])


# ------------------------------------------------------------------------------------------------------------------
# detector


def test_detector_exact_on_ground_truth(train_scenes):
    for s in train_scenes:
        dets = detect(W.render(s))
        assert _det_set(dets) == _gt_set(s), s.id
        assert all(d.score == 1.0 for d in dets)
    # other render sizes: same objects, boxes scaled
    for s in train_scenes[:40]:
        dets = detect(W.render(s, 128))
        assert sorted((d.shape, d.color) for d in dets) == sorted((o.shape, o.color) for o in s.objects)


@pytest.mark.parametrize("blur", [0.0, 0.8, 1.2])
def test_detector_robust_to_noise_and_blur(train_scenes, blur):
    rng = np.random.default_rng(0)
    for s in train_scenes[:150]:
        img = W.render(s)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        arr = np.asarray(img, np.float64) + rng.normal(0, 8, (64, 64, 3))
        dets = detect(np.clip(np.round(arr), 0, 255).astype(np.uint8))
        assert sorted((d.shape, d.color) for d in dets) == sorted((o.shape, o.color) for o in s.objects), s.id
        for d in dets:  # boxes stay within a pixel of the truth
            o = next(o for o in s.objects if (o.shape, o.color) == (d.shape, d.color))
            assert np.abs(np.subtract(d.bbox, o.box)).max() <= 1.0


def test_detector_finds_nothing_in_blank_images():
    for bg in (W.Background("flat", t, t) for t in W.BACKGROUND_TONES):
        assert detect(W.render(W.Scene("blank", (), bg))) == []
    assert detect(W.render(W.Scene("g", (), W.Background("dgrad", W.BACKGROUND_TONES[1], W.BACKGROUND_TONES[2])))) == []
    for v in (0, 128, 255):
        assert detect(np.full((64, 64, 3), v, np.uint8)) == []
    noise = np.random.default_rng(0).normal(230, 8, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    assert detect(noise) == []


# ------------------------------------------------------------------------------------------------------------------
# questions and captions: answers checked against what the detector sees in the render


def _answer_from_detections(question: str, dets) -> str:
    by = lambda **kw: [d for d in dets if all(getattr(d, k) == v for k, v in kw.items())]  # noqa: E731
    plural = {W.make_plural(s): s for s in W.SHAPES}
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (d,) = by(shape=m[1])
        return d.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (d,) = by(color=m[1])
        return d.shape
    if m := re.fullmatch(r"What size is the (\w+) (\w+)\?", question):
        (d,) = by(color=m[1], shape=m[2])
        return "small" if d.bbox[2] - d.bbox[0] < 12 else "large"
    if m := re.fullmatch(r"How many objects are there\?", question):
        return str(len(dets))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(len(by(color=m[1])))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(len(by(shape=plural[m[1]])))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if by(color=m[1], shape=m[2]) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        (a,), (b,) = by(color=m[1], shape=m[2]), by(color=m[4], shape=m[5])
        return "yes" if m[3] in W.relative_position(a.bbox, b.bbox) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_question_answers_match_the_render(train_scenes):
    types, yes_no = set(), {"exists": [], "position": []}
    for s in train_scenes:
        dets = detect(W.render(s))
        qs = W.questions(s)
        assert len({q["question"] for q in qs}) == len(qs)
        for q in qs:
            assert q["type"] in W.QUESTION_TYPES
            assert normalize_answer(q["answer"]) == q["answer"]
            assert _answer_from_detections(q["question"], dets) == q["answer"], (s.id, q)
            types.add(q["type"])
            if q["type"] in yes_no:
                yes_no[q["type"]].append(q["answer"] == "yes")
        caps = W.captions(s)
        assert caps[1] == "a photo of " + W._join([W.with_article(o.name()) for o in s.objects])
    assert types == set(W.QUESTION_TYPES)
    assert np.mean(yes_no["exists"]) == 0.5
    assert 0.4 < np.mean(yes_no["position"]) < 0.6


# ------------------------------------------------------------------------------------------------------------------
# GenEval-rule scorer


def test_relative_position_is_genevals_rule():
    rp = W.relative_position
    assert rp((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert rp((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert rp((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert rp((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert rp((0, 0, 10, 10), (16, 16, 26, 26)) == {"left of", "above"}  # diagonal: both
    assert rp((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # inside the 0.1*(dimA+dimB) margin
    assert rp((0, 0, 10, 10), (0, 0, 10, 10)) == set()
    # |dy| - margin just below 0.5 of the unrevised norm -> not "above"
    assert rp((0, 0, 10, 10), (32, 20, 42, 30)) == {"left of"}


def _score_all(prompts, rng, make_image=W.render):
    results = []
    for m in prompts:
        scene = W.scene_for_prompt(m, rng)
        results.append(G.score_image(make_image(scene), m))
    return results


def test_scorer_is_100_percent_on_ground_truth_renders():
    rng = np.random.default_rng(0)
    prompts = [m for t in W.GENEVAL_TAGS for m in W.enumerate_prompts(t) if t != "color_attr"]
    prompts += W.enumerate_prompts("color_attr")[::4]
    results = _score_all(prompts, rng)
    bad = [(r["prompt"], r["reason"]) for r in results if not r["correct"]]
    assert not bad, bad[:5]
    summ = G.summarize(results)
    assert summ["overall"] == 1.0 and set(summ["per_task"]) == set(W.GENEVAL_TAGS)
    assert summ["correct_images"] == 1.0 and summ["correct_prompts"] == 1.0
    # with distractor objects of other shapes, and for every prompt a random scene claims to satisfy
    for m in W.geneval_prompts(20, seed=1):
        if m["tag"] != "counting" or m["include"][0]["count"] < 4:
            assert G.score_image(W.render(W.scene_for_prompt(m, rng, n_distractors=1)), m)["correct"], m
    for s in W.generate_split("validation", 60, seed=0):
        img = W.render(s)
        for m in W.t2i_prompts(s):
            r = G.score_image(img, m)
            assert r["correct"], (s.id, m["prompt"], r["reason"])


def test_scorer_tolerates_noise_and_mild_blur():
    rng = np.random.default_rng(1)
    noise = np.random.default_rng(2)

    def degrade(scene):
        img = W.render(scene).filter(ImageFilter.GaussianBlur(0.8))
        arr = np.asarray(img, np.float64) + noise.normal(0, 8, (64, 64, 3))
        return np.clip(np.round(arr), 0, 255).astype(np.uint8)

    results = _score_all(W.geneval_prompts(25, seed=3), rng, degrade)
    assert G.summarize(results)["overall"] == 1.0, [r["reason"] for r in results if not r["correct"]][:5]


def test_scorer_is_0_on_blank_images():
    prompts = W.geneval_prompts(30, seed=0)
    blanks = [W.render(W.Scene("blank", (), W.Background("flat", t, t))) for t in W.BACKGROUND_TONES[:3]]
    blanks += [Image.new("RGB", (64, 64), c) for c in ("white", "black")]
    results = [G.score_image(b, m) for m in prompts for b in blanks]
    assert not any(r["correct"] for r in results)
    assert G.summarize(results)["overall"] == 0.0
    assert results[0]["reason"].startswith("expected ")


def _recolor(scene, idx, color):
    objs = list(scene.objects)
    objs[idx] = W.Obj(objs[idx].shape, color, objs[idx].size, objs[idx].x, objs[idx].y)
    return W.Scene(scene.id + "-wrong", tuple(objs), scene.background)


def test_scorer_fails_wrong_images():
    rng = np.random.default_rng(3)
    n_checked = {"color": 0, "count": 0, "position": 0, "shape": 0}
    for m in W.geneval_prompts(40, seed=5):
        scene = W.scene_for_prompt(m, rng)
        assert G.score_image(W.render(scene), m)["correct"]
        objs = list(scene.objects)
        wrong = []
        if m["tag"] in ("colors", "color_attr"):  # wrong colour on a required object
            it = m["include"][0]
            i = next(k for k, o in enumerate(objs) if o.shape == it["class"])
            used = {o.color for o in objs}
            new = next(c for c in W.COLOR_NAMES if c != it["color"] and c not in used)
            wrong.append(_recolor(scene, i, new))
            n_checked["color"] += 1
        if m["tag"] == "counting":  # one object too few, one too many
            it = m["include"][0]
            same = [o for o in objs if o.shape == it["class"]]
            wrong.append(W.Scene("fewer", tuple(o for o in objs if o is not same[0]), scene.background))
            free = [c for c in range(16) if all((o.x // 16) + 4 * (o.y // 16) != c for o in objs)]
            used = {o.color for o in same}
            extra = [W.Obj(it["class"], col, "small", 16 * (c % 4) + 8, 16 * (c // 4) + 8)
                     for c in free for col in W.COLOR_NAMES if col not in used][:1]
            wrong.append(W.Scene("more", tuple(objs) + tuple(extra), scene.background))
            n_checked["count"] += 1
        if m["tag"] == "position":  # swap the two objects' places
            a, b = objs
            wrong.append(W.Scene("swap", (W.Obj(a.shape, a.color, a.size, b.x, b.y),
                                          W.Obj(b.shape, b.color, b.size, a.x, a.y)), scene.background))
            n_checked["position"] += 1
        if m["tag"] in ("single_object", "two_object"):  # a required shape replaced by an unmentioned one
            names = {it["class"] for it in m["include"]}
            other = next(s for s in W.SHAPES if s not in names)
            o = objs[0]
            wrong.append(W.Scene("shape", (W.Obj(other, o.color, o.size, o.x, o.y),) + tuple(objs[1:]),
                                 scene.background))
            n_checked["shape"] += 1
        for sc in wrong:
            r = G.score_image(W.render(sc), m)
            assert not r["correct"], (m["prompt"], sc)
            assert r["reason"]
    assert all(v > 0 for v in n_checked.values()), n_checked


def test_score_folder_layout(tmp_path):
    rng = np.random.default_rng(0)
    prompts = W.geneval_prompts(3, seed=0)
    folders = [write_prompt_folder(tmp_path, i, m) for i, m in enumerate(prompts)]
    for folder, m in zip(folders, prompts):
        for k in range(2):
            W.render(W.scene_for_prompt(m, rng)).save(folder / "samples" / f"{k:04d}.png")
        Image.new("RGB", (64, 64), "white").save(folder / "samples" / "grid.png")  # skipped: not \d+.png
    (tmp_path / "notes").mkdir()  # skipped: not digits
    from eval.geneval import score_folder

    results, unreadable = score_folder(tmp_path, G.ShapesDetector())
    assert not unreadable and len(results) == 2 * len(prompts)
    assert G.summarize(results)["overall"] == 1.0


# ------------------------------------------------------------------------------------------------------------------
# VQA scorer for the world


def test_world_vqa_scorer(train_scenes):
    qs = [q for s in train_scenes[:50] for q in W.questions(s)]
    assert score_vqa([q["answer"] for q in qs], qs)["accuracy"] == 1.0
    variants = {"yes": ["Yes", "yes.", " YES ", "Yes!"], "2": ["two", "Two.", "2"], "red": ["Red", "the red", "red."],
                "circle": ["a circle", "Circle.", "the circle"]}
    for ans, preds in variants.items():
        r = score_vqa(preds, [{"answer": ans, "type": "t"}] * len(preds))
        assert r["accuracy"] == 1.0, (ans, r)
    r = score_vqa(["no", "3", "blue", "red circle"], [{"answer": a, "type": t} for a, t in
                                                      (("yes", "exists"), ("2", "count"), ("red", "color"),
                                                       ("red", "color"))])
    assert r["accuracy"] == 0.0 and r["per_type"] == {"exists": 0.0, "count": 0.0, "color": 0.0}


def test_wordings_change_the_words_not_the_questions():
    """Every wording asks the same questions with the same answers; canonical is WORDINGS[k][0] (the scored test
    set, unchanged); varied draws several training wordings; the held-out paraphrases share no template with them."""
    scenes = W.generate_split("train", 40, seed=0)
    seen_varied = set()
    for s in scenes:
        qs = {w: W.questions(s, wording=w) for w in W.WORDING_STYLES}
        for w in W.WORDING_STYLES:
            assert [(q["answer"], q["type"]) for q in qs[w]] == [(q["answer"], q["type"]) for q in qs["canonical"]]
        assert W.questions(s, wording="varied") == qs["varied"]  # deterministic per scene
        seen_varied.update(q["question"] for q in qs["varied"])
        for q in qs["canonical"]:
            assert any(_matches(q["question"], kind[0]) for kind in W.WORDINGS.values()), q
        for q in qs["paraphrase"]:
            assert any(_matches(q["question"], t) for t in W.PARAPHRASES.values()), q
    canonical = {q["question"] for s in scenes for q in W.questions(s)}
    assert len(seen_varied - canonical) > 50
    training = [t for kind in W.WORDINGS.values() for t in kind]
    assert not set(W.PARAPHRASES.values()) & set(training)
    assert W.questions(scenes[0])[0]["question"] == "What color is the cross?"
    with pytest.raises(ValueError, match="wording"):
        W.questions(scenes[0], wording="shouty")


def _matches(question: str, template: str) -> bool:
    pattern = re.escape(template)
    for field in ("shape", "color", "shapes", "a_object", "a", "relation", "b"):
        pattern = pattern.replace(re.escape("{" + field + "}"), ".+")
    return re.fullmatch(pattern, question) is not None


def test_probe_targets_put_each_object_in_its_position():
    from demo.probe import fit_probe, position_targets

    scene = W.Scene("s", (W.Obj("cross", "blue", "small", 8, 24), W.Obj("circle", "red", "large", 56, 56)))
    t = position_targets([scene])
    assert t["occupied"].tolist() == [0] * 4 + [1] + [0] * 10 + [1]
    assert (t["color"][4], t["shape"][4], t["size"][4]) == (W.COLOR_NAMES.index("blue"), W.SHAPES.index("cross"),
                                                            list(W.SIZES).index("small"))
    assert t["shape"][15] == W.SHAPES.index("circle") and t["color"][0] == -1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] > 0).long()
    assert fit_probe(x[:300], y[:300], x[300:], y[300:]) > 0.95  # a linearly separable target is read
    assert fit_probe(x[:300], torch.randint(0, 2, (300,), generator=g), x[300:],
                     torch.randint(0, 2, (100,), generator=g)) < 0.7  # noise is not


def routing_probe(*names):
    """Functions of the one-off routing probe script, docs/probes/prompt_routing.py."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "probes" / "prompt_routing.py"
    spec = importlib.util.spec_from_file_location("prompt_routing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [getattr(module, n) for n in names]


def test_object_conditioning_scores_the_object_position(tmp_path):
    """The text-to-image probe's object NLL (docs/demo.md: "generation ignores the colour word") is the NLL of exactly the
    codes at the object's position: codes after it leave it unchanged, its own change it, and over all positions it
    sums to the model's image cross-entropy. object_conditioning's three conditions are that NLL for the prompt as
    given, the prompt with the attribute word swapped, and the earlier positions' codes swapped."""
    import dataclasses

    from demo.probe import cell_index
    from eval.shapes.evaluate import encode_scenes
    object_conditioning, object_nll = routing_probe("object_conditioning", "object_nll")
    from mllm.cli import load_mllm, load_unitok
    from mllm_train_helpers import write_tiny_pair

    root = write_tiny_pair(tmp_path, spread=1.0)
    model, processor = load_mllm(str(root / "mllm"), "cpu")
    unitok = load_unitok(str(root / "unitok"), model, model.device)
    scene = W.Scene("s", (W.Obj("circle", "red", "large", 40, 24),))  # cell 6
    j = cell_index(scene.objects[0])
    assert j == 6
    codes = encode_scenes(unitok, [scene])[0]
    K, N = codes.shape
    prompt = "a photo of a red circle"
    nll = [object_nll(model, processor, prompt, codes, p) for p in range(N)]
    e = processor.text_to_image(prompt)
    with torch.no_grad():
        ce = model(input_ids=torch.tensor([e.input_ids]), image_codes=codes[None],
                   labels=torch.tensor([e.labels])).image_ce
    assert sum(nll) / (K * N) == pytest.approx(float(ce), rel=1e-5)
    later, own = codes.clone(), codes.clone()
    later[:, j + 1:] = (later[:, j + 1:] + 1) % model.config.codebook_size
    own[:, j] = (own[:, j] + 1) % model.config.codebook_size
    assert object_nll(model, processor, prompt, later, j) == pytest.approx(nll[j], rel=1e-5)
    assert abs(object_nll(model, processor, prompt, own, j) - nll[j]) > 1e-3

    corner = W.Scene("c", (W.Obj("square", "blue", "small", 8, 8),))  # position 0: no codes before it, skipped
    c = object_conditioning(model, processor, unitok, [(prompt, scene), ("a photo of a blue square", corner)],
                            "color", W.COLOR_NAMES)
    assert c["n"] == 1 and c["matched"] == pytest.approx(nll[j], rel=1e-6)
    orange = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], color="orange"),))
    assert c["prompt_swapped"] == pytest.approx(object_nll(model, processor, "a photo of an orange circle", codes, j),
                                                rel=1e-6)
    mixed = encode_scenes(unitok, [orange])[0]
    mixed[:, j:] = codes[:, j:]
    assert c["context_swapped"] == pytest.approx(object_nll(model, processor, prompt, mixed, j), rel=1e-6)
