"""`unitok eval tokenizer`: PSNR / SSIM by LlamaGen's protocol with skimage's arithmetic, rFID with torch-fidelity's
Inception and formula, LPIPS, codebook usage / perplexity and open_clip's zero-shot protocol. Where the reference
packages are importable ($UNITOK_REFS_PATH: scikit-image and torch-fidelity installed without their dependencies,
as .ci/run does), the figures are compared with theirs; the constants below were produced by skimage 0.26.0."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unitok_cli
from metrics.inception import InceptionV3Features
from eval.tokenizer_metrics import (center_crop_arr, codebook_usage, fid_from_features, llamagen_pair, psnr, ssim,
                                    topk_hits, zero_shot_classifier)

REFS = os.environ.get("UNITOK_REFS_PATH")
needs_refs = pytest.mark.skipif(not (REFS and (Path(REFS) / "skimage").is_dir()),
                                reason="reference packages not installed: set UNITOK_REFS_PATH (.ci/refs-deps.txt)")


def pair_arrays():
    """A deterministic (restored, gt) pair of [24, 20, 3] float32 images in [0, 1]."""
    yy, xx, cc = np.meshgrid(np.arange(24), np.arange(20), np.arange(3), indexing="ij")
    gt = (((xx * 7 + yy * 3 + cc * 50) % 256) / 255).astype(np.float32)
    rest = ((np.floor(((xx * 5 + yy * 11 + cc * 13) % 17) + gt * 255 * 0.9)) / 255).clip(0, 1).astype(np.float32)
    return rest, gt


def test_psnr_and_ssim_reproduce_skimage_constants():
    rest, gt = pair_arrays()
    assert psnr(rest, gt) == 27.916096917383445
    assert ssim(rest, gt) == 0.9619913101196289  # data_range 2.0, LlamaGen's quirk
    assert ssim(rest, gt, data_range=1.0) == 0.9495571255683899
    assert ssim(gt, gt) == 1.0


@needs_refs
def test_psnr_and_ssim_equal_skimage_on_random_images():
    sys.path.insert(0, REFS)
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    for shape in [(16, 16, 3), (37, 23, 3), (64, 64, 3)]:
        gt = rng.random(shape).astype(np.float32)
        rest = (np.floor(np.clip(gt + 0.05 * rng.standard_normal(shape), 0, 1) * 255) / 255).astype(np.float32)
        assert psnr(rest, gt) == peak_signal_noise_ratio(rest, gt)
        assert ssim(rest, gt) == structural_similarity(rest, gt, channel_axis=-1, data_range=2.0)


def test_llamagen_pair_truncates_the_reconstruction():
    x = torch.zeros(3, 2, 2)
    y = torch.tensor([0.5, -1.0, 1.0, -0.5])[None, :, None].expand(3, 4, 1).reshape(3, 2, 2)
    restored, gt = llamagen_pair(x, y)
    # 127.5 y + 128 truncated: 0.5 -> 191.75 -> 191 (rounding would give 192), -1 -> 0.5 -> 0, 1 -> 255.5 -> 255,
    # -0.5 -> 64.25 -> 64
    assert (restored[..., 0] * 255).round().tolist() == [[191, 0], [255, 64]]
    assert gt.dtype == np.float32 and np.all(gt == 0.5)


def test_fid_formula():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((50, 8)).astype(np.float32)
    assert abs(fid_from_features(f, f)) < 1e-6
    # equal covariances, means apart by d: FID = |d|^2
    d = np.arange(8, dtype=np.float32) / 4
    assert fid_from_features(f, f + d) == pytest.approx(float(d @ d), rel=1e-5)
    # against the scipy.linalg.sqrtm form (torch-fidelity 0.3.0)
    from scipy import linalg

    g = rng.standard_normal((60, 8)).astype(np.float32) * 1.5 + 0.3
    s1, s2 = np.cov(f, rowvar=False), np.cov(g, rowvar=False)
    diff = f.mean(0) - g.mean(0)
    ref = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(f, g) == pytest.approx(ref, abs=1e-9)
    with pytest.raises(ValueError, match="FID needs two"):
        fid_from_features(f[:1], g)


def random_inception(path: Path) -> Path:
    torch.manual_seed(0)
    model = InceptionV3Features()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), path)
    return path


def test_inception_loads_strictly_and_checks_its_input(tmp_path):
    path = random_inception(tmp_path / "inc.pth")
    model = InceptionV3Features.from_file(path)
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    assert model(x).shape == (2, 2048)
    state = torch.load(path, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="missing \\['Mixed_7c.branch_pool.conv.weight'\\]"):
        InceptionV3Features.from_file(tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="expected uint8 images"):
        model(x.float())


@needs_refs
def test_inception_features_equal_torch_fidelity(tmp_path):
    path = random_inception(tmp_path / "inc.pth")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    pkg = types.ModuleType("torch_fidelity")  # its __init__ imports torchvision; the extractor itself does not
    pkg.__path__ = [str(Path(REFS) / "torch_fidelity")]
    sys.modules["torch_fidelity"] = pkg
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    x = torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8)
    assert torch.equal(InceptionV3Features.from_file(path)(x), theirs(x)[0])


def test_codebook_usage_and_perplexity():
    counts = np.array([[5, 5, 5, 5], [10, 0, 0, 0], [6, 2, 0, 0]])
    out = codebook_usage(counts)
    assert [b["usage"] for b in out] == [1.0, 0.25, 0.5] and [b["used"] for b in out] == [4, 1, 2]
    assert out[0]["perplexity"] == pytest.approx(4.0) and out[1]["perplexity"] == 1.0
    assert out[2]["perplexity"] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))


def test_topk_hits_and_center_crop():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2]])
    assert topk_hits(logits, torch.tensor([1, 2, 0]), (1, 2)) == [1, 2]
    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    assert center_crop_arr(img, 64).size == (64, 64)
    same = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(center_crop_arr(same, 64)), np.asarray(same))  # identity at the side


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tokenizer import UniTok, UniTokConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "unitok"
    UniTok(UniTokConfig.from_preset("tiny")).save_pretrained(path)
    return path


def test_reconstruction_figures_through_the_cli(tiny_tokenizer, tmp_path, capsys):
    from tokenizer import UniTok
    from tokenizer.image import to_tensor
    from metrics.lpips import LPIPS

    data = tmp_path / "images"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (80, 64), (64, 96)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            data / ("sub" if i == 2 else "") / f"{i}.png")
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(1)
    torch.save(LPIPS().state_dict(), tmp_path / "lpips.pth")
    random_inception(tmp_path / "inc.pth")
    assert unitok_cli.main(["eval", "tokenizer", "--tokenizer", str(tiny_tokenizer), "--data", str(data),
                            "--inception-weights", str(tmp_path / "inc.pth"), "--lpips-weights",
                            str(tmp_path / "lpips.pth"), "--out", str(tmp_path / "m.json"), "--batch-size", "2"]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["n_images"] == 3 and len(out["unreadable"]) == 1 and "broken.jpg" in out["unreadable"][0]
    assert "broken.jpg" in capsys.readouterr().err
    # the same figures computed here, image by image
    unitok = UniTok.from_pretrained(tiny_tokenizer).eval()
    paths = [data / "0.png", data / "1.png", data / "sub" / "2.png"]
    x = torch.stack([to_tensor(center_crop_arr(Image.open(p).convert("RGB"), 64)) for p in paths])
    with torch.no_grad():
        codes = unitok.encode(x)
        rec = unitok.decode(codes)
    pairs = [llamagen_pair(a, b) for a, b in zip(x, rec)]
    assert out["psnr"] == pytest.approx(np.mean([psnr(*p) for p in pairs]), rel=1e-12)
    assert out["ssim"] == pytest.approx(np.mean([ssim(*p) for p in pairs]), rel=1e-12)
    counts = np.stack([np.bincount(codes[:, k].flatten().numpy(), minlength=256) for k in range(8)])
    assert out["codebooks"] == codebook_usage(counts) and len(out["codebooks"]) == 8
    assert out["rfid"] > 0 and out["lpips"] > 0


def test_zero_shot_through_the_cli(tiny_tokenizer, tmp_path):
    from tokenizer import UniTok

    classes = ["cat", "dog", "red car"]
    data = tmp_path / "val"
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(["n01", "n02", "n03"]):
        (data / wnid).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(data / wnid / f"{j}.JPEG")
    spec = {"classnames": classes, "templates": ["a photo of a {}.", "a bad photo of the {}."]}
    (tmp_path / "zs.json").write_text(json.dumps(spec))
    assert unitok_cli.main(["eval", "tokenizer", "--tokenizer", str(tiny_tokenizer), "--data", str(data),
                            "--zero-shot", str(tmp_path / "zs.json"), "--out", str(tmp_path / "z.json")]) == 0
    out = json.loads((tmp_path / "z.json").read_text())
    assert out["n_images"] == 6 and out["top5"] == 100.0  # 3 classes: top-k over all of them
    # the classifier is the normalised mean of normalised template embeddings
    unitok = UniTok.from_pretrained(tiny_tokenizer).eval()
    with torch.no_grad():
        w = zero_shot_classifier(unitok, classes, spec["templates"])
        e = unitok.encode_text(unitok.tokenize_text(["a photo of a red car.", "a bad photo of the red car."]),
                               normalize=True)
    col = e.mean(0) / e.mean(0).norm()
    assert torch.allclose(w[:, 2], col) and torch.allclose(w.norm(dim=0), torch.ones(3))
    (tmp_path / "bad.json").write_text(json.dumps({"classnames": classes[:2], "templates": ["{}"]}))
    assert unitok_cli.main(["eval", "tokenizer", "--tokenizer", str(tiny_tokenizer), "--data", str(data),
                            "--zero-shot", str(tmp_path / "bad.json")]) == 2
