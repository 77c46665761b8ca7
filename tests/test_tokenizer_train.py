"""Tokenizer training: data sources, bad records, config errors, a short CPU run that learns, exact resume."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unitok_cli
from train.common.config import ConfigError
from train.common.tracking import read_jsonl_metrics
from train.tokenizer.config import DataConfig, TokenizerTrainConfig
from train.tokenizer.data import RandomResizedCrop, build_source, build_stream
from train.tokenizer.trainer import GANSchedule, reconstruction_losses, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"


def _quadrants(i: int, size: int = 36) -> np.ndarray:
    """Four flat colour blocks: easy to reconstruct, so a few dozen CPU steps show learning."""
    colors = np.random.default_rng(i).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    return np.kron(colors, np.ones((size // 2, size // 2, 1), dtype=np.uint8))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_quadrants(i)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quads")
    for i in range(32):
        (root / f"img{i:03d}.png").write_bytes(_png(i))
        (root / f"img{i:03d}.txt").write_text(f"four colour blocks, picture {i}")
    return root


def _cfg(data: Path, out: Path, *overrides: str) -> TokenizerTrainConfig:
    return TokenizerTrainConfig.load(TINY, [f"data.paths=['{data}']", f"train.output_dir={out}",
                                            "model.overrides.image_size=32", "data.num_workers=0",
                                            *overrides])


# ================================================================================================ training
def test_tiny_training_learns_logs_and_resumes_exactly(image_folder, tmp_path):
    common = ("train.steps=60", "train.save_every=20", "train.keep_last=3", "train.log_every=1",
              "train.grid_every=30", "disc.start_fraction=0.4", "disc.warmup_fraction=0.1")
    run1 = tmp_path / "run1"
    hist = train(_cfg(image_folder, run1, *common))
    assert [h["step"] for h in hist] == list(range(1, 61))

    # Reconstruction MSE falls by at least half (measured: ~0.5 -> ~0.1).
    first, last = hist[0]["l2"], float(np.mean([h["l2"] for h in hist[-5:]]))
    assert last <= 0.5 * first, (first, last)
    # The GAN phase ran: discriminator from step 25 (0-based 24), generator weight ramps up from 0.
    assert all("d_loss" not in h for h in hist[:24]) and all("d_loss" in h for h in hist[24:])
    assert hist[24]["ramp"] == 0.0 and hist[30]["ramp"] == 1.0 and hist[30]["w_g"] > 0
    assert all(0.0 <= h["logit_scale"] <= 100.0 for h in hist)

    # Logs: JSONL + TensorBoard events + PNG grids (row 1 inputs, row 2 reconstructions).
    rows = read_jsonl_metrics(run1 / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert rows[0]["train/l2"] == pytest.approx(first) and rows[-1]["train/images_per_s"] > 0
    events = list((run1 / "logs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    for step in (30, 60):
        grid = Image.open(run1 / "samples" / f"step-{step:08d}.png")
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # 8 images of 32 px, padding 2

    # Checkpoints: atomic dirs, keep-last 3, model in safetensors via save_pretrained; a final export.
    ckpts = sorted(p.name for p in (run1 / "checkpoints").iterdir())
    assert ckpts == ["step-00000020", "step-00000040", "step-00000060"]
    assert (run1 / "checkpoints" / "step-00000040" / "model" / "model.safetensors").is_file()
    from tokenizer import UniTok

    model = UniTok.from_pretrained(run1 / "model")
    x = torch.from_numpy(_quadrants(0)[2:34, 2:34]).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert model.encode(x).shape == (1, 8, 4)

    # Resume from step 40 into a fresh directory: steps 41..60 reproduce the uninterrupted run exactly.
    run2 = tmp_path / "run2"
    hist2 = train(_cfg(image_folder, run2, *common), resume=str(run1 / "checkpoints" / "step-00000040"))
    assert [h["step"] for h in hist2] == list(range(41, 61))
    for a, b in zip(hist[40:], hist2):
        for key in ("loss", "l1", "l2", "vq", "clip", "g_loss", "w_g", "d_loss", "grad_norm", "d_grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    from safetensors.torch import load_file

    w1, w2 = load_file(run1 / "model" / "model.safetensors"), load_file(run2 / "model" / "model.safetensors")
    # vocab_usage is a logging EMA whose call counter is not saved (as in the reference); all else is identical.
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if not k.endswith("vocab_usage"))


# ================================================================================================ data
def test_random_resized_crop_matches_the_released_transform():
    t = RandomResizedCrop(32, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    rng = np.random.default_rng(0)
    for _ in range(200):
        i, j, h, w = t.params(100, 60, rng)
        assert 0 <= i and i + h <= 60 and 0 <= j and j + w <= 100
        assert 0.9 * 6000 * 0.95 <= h * w <= 6000 or (h, w) == (60, 80)  # rounding, or the centre-crop fallback
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert t.params(400, 40, np.random.default_rng(0)) == (0, 173, 40, 53)  # too wide: centre crop at ratio 4/3
    img = Image.fromarray(_quadrants(3, 40))
    a, b = t(img, np.random.default_rng(5)), t(img, np.random.default_rng(5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert -1.0 <= a.min() and a.max() <= 1.0
    # full-image crop of a flat image: exact value mapping x/127.5 - 1
    flat = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))(Image.new("RGB", (8, 8), (0, 255, 51)),
                                                                      np.random.default_rng(0))
    assert torch.allclose(flat[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def _write_sources(root: Path) -> dict[str, Path]:
    """The same 6 captioned images as JSONL (+ one corrupt, one missing), parquet, and a webdataset shard."""
    import datasets

    (root / "j").mkdir()
    lines = []
    for i in range(6):
        (root / "j" / f"{i}.png").write_bytes(_png(i))
        lines.append({"image": f"{i}.png", "text": f"cap {i}"})
    (root / "j" / "bad.png").write_bytes(b"not an image")
    lines += [{"image": "bad.png", "text": "broken"}, {"image": "gone.png", "text": "missing"}]
    (root / "j" / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(6)],
                                "text": [f"cap {i}" for i in range(6)]}, features=feats).to_parquet(root / "d.parquet")
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", _png(i)), ("txt", f"cap {i}".encode())):  # PIL sniffs the real format
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"jsonl": root / "j" / "data.jsonl", "parquet": root / "d.parquet",
            "webdataset": root / "shard-{000..000}.tar"}


def test_sources_read_the_same_records_and_resume_exactly(tmp_path):
    paths = _write_sources(tmp_path)
    for fmt, path in paths.items():
        # (streaming parquet is left out: datasets sleeps 5 s at the end of every shuffled parquet pass)
        for streaming in (False, True) if fmt != "parquet" else (False,):
            cfg = DataConfig(paths=[str(path)], streaming=streaming, num_workers=0, cache_dir=str(tmp_path / "hf"),
                             bad_check_min_records=10_000)
            stream = build_stream(cfg, 32, batch_size=4, seed=0)
            assert stream.source.format == fmt
            batches = iter(stream)
            texts = sorted(t for _ in range(3) for t in next(batches)["texts"])  # 12 good records = 2 epochs
            assert texts == sorted([f"cap {i}" for i in range(6)] * 2)
            if fmt == "jsonl":  # the corrupt and the missing file are skipped, counted per reason
                assert stream.stats.bad == 4 and stream.stats.seen == 16
                assert set(stream.stats.reasons) == {"cannot decode image (UnidentifiedImageError)",
                                                     "image file not found"}
    # Exact continuation of the data stream from a saved position, with 2 workers.
    cfg = DataConfig(paths=[str(paths["jsonl"])], num_workers=2, bad_check_min_records=10_000)
    a = build_stream(cfg, 32, batch_size=3, seed=7)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # plain data, as checkpointed
    expected = [next(it) for _ in range(3)]
    b = build_stream(cfg, 32, batch_size=3, seed=7)
    b.load_state_dict(state)
    batches_b = iter(b)
    got = [next(batches_b) for _ in range(3)]
    for e, g in zip(expected, got):
        assert e["texts"] == g["texts"] and torch.equal(e["images"], g["images"])
    assert b.stats.state_dict() == a.stats.state_dict()


def test_folder_captions_and_bad_record_limit(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.png").write_bytes(_png(i))
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"jsonl {i}"}) + "\n"
                                                   for i in range(4)))
    for i in range(4, 7):
        (folder / f"{i}.txt").write_text(f"sidecar {i}")
    (folder / "8.png").write_bytes(_png(8)[:60])  # truncated; 7.png has no caption
    cfg = DataConfig(paths=[str(folder)], num_workers=0, bad_check_min_records=10_000)
    stream = build_stream(cfg, 32, batch_size=7, seed=0)
    texts = sorted(next(iter(stream))["texts"])
    assert texts == sorted([f"jsonl {i}" for i in range(4)] + [f"sidecar {i}" for i in range(4, 7)])
    assert stream.stats.bad == 2 and dict(stream.stats.reasons) == {"no caption": 1, "cannot decode image (OSError)": 1}

    # 2 bad of 9 records = 22 % > 10 %: training stops with a clear message (through the CLI).
    code = unitok_cli.main(["train-tokenizer", "--config", str(TINY), f"data.paths=['{folder}']",
                            f"train.output_dir={tmp_path / 'run'}", "model.overrides.image_size=32",
                            "data.num_workers=0", "data.max_bad_fraction=0.1", "data.bad_check_min_records=9",
                            "train.batch_size=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "too many bad records in the data: 2 of 9 (22.2%) exceed data.max_bad_fraction=0.1" in err
    assert "no caption" in err


# ================================================================================================ config
def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  stpes: 3\n")
    assert unitok_cli.main(["train-tokenizer", "--config", str(bad)]) == 2
    assert "unknown config key 'train.stpes'" in capsys.readouterr().err

    bad.write_text("optim:\n  lr: fast\n")
    assert unitok_cli.main(["train-tokenizer", "--config", str(bad)]) == 2
    assert "config key 'optim.lr' expects float, got str 'fast'" in capsys.readouterr().err

    with pytest.raises(ConfigError, match="'disc.betas' expects 2 values"):
        TokenizerTrainConfig.load(TINY, ["disc.betas=[0.5]"])
    with pytest.raises(ConfigError, match="'data.format' must be one of"):
        TokenizerTrainConfig.load(TINY, ["data.format=zip"])
    with pytest.raises(ConfigError, match="set the entropy weight with loss.entropy"):
        TokenizerTrainConfig.load(TINY, ["model.overrides.entropy_weight=0.1"])

    # Both shipped recipes parse; the large one carries the released values.
    large = TokenizerTrainConfig.load(REPO / "configs" / "tokenizer" / "unitok-large.yaml")
    assert (large.loss.l1, large.loss.l2, large.loss.lpips, large.loss.vq, large.loss.clip) == (0.2, 1.0, 1.0, 1.0, 1.0)
    assert (large.optim.lr, large.optim.betas, large.optim.eps, large.optim.weight_decay) == (5e-4, (0.9, 0.95), 1e-6, 0.02)
    assert (large.disc.lr, large.disc.weight_decay, large.disc.betas, large.disc.weight) == (2e-5, 0.2, (0.5, 0.9), 0.4)
    assert large.disc_start_step == round(0.375 * large.train.steps) and large.optim.warmup_steps == 781
    assert unitok_cli.main(["train-tokenizer", "--config", str(TINY), "--print-config", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out


# ================================================================================================ loss pieces
def test_gan_schedule_and_reconstruction_losses():
    s = GANSchedule(start=100, warmup=10, image_size=256, blur=True)
    assert not s.active(99) and s.active(100)
    assert [s.ramp(t) for t in (99, 100, 105, 110, 500)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert s.sigma(99) == 0.0 and s.sigma(100) == pytest.approx(128 ** 0.5)  # sqrt(H / 2)
    assert s.sigma(110) == pytest.approx(128 ** 0.5 / 2) and s.sigma(120) == 0.0
    assert GANSchedule(0, 10, 256, blur=False).sigma(0) == 0.0
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.5)
    losses = reconstruction_losses(x, y)
    assert losses["l1"].item() == pytest.approx(0.5) and losses["l2"].item() == pytest.approx(0.25)


# ================================================================================================ shapes world
def test_shapes_source_is_deterministic_exact_and_resumable():
    from shapes import world as W
    from train.tokenizer.data import ShapesDataset, to_tensor

    ds = ShapesDataset(1000, "train", seed=3)
    again, other = ShapesDataset(1000, "train", seed=3), ShapesDataset(1000, "train", seed=4)
    for i in (0, 1, 999):
        rec = ds[i]
        assert ds.scene(i) == again.scene(i) and W.scene_split(ds.scene(i)) == "train"
        assert np.array_equal(np.asarray(rec["image"]), np.asarray(W.render(ds.scene(i))))
        assert rec["text"] == W.captions(ds.scene(i)) and rec["__key__"] == ds.scene(i).id
    assert [ds.scene(i) for i in range(20)] != [other.scene(i) for i in range(20)]
    test_layouts = {W.layout_key(s.objects) for s in W.generate_split("test", 200, seed=0)}
    assert not test_layouts & {W.layout_key(ds.scene(i).objects) for i in range(300)}
    with pytest.raises(IndexError):
        ds.scene(1000)

    cfg = DataConfig(format="shapes", shapes_scenes=50, shapes_seed=3, num_workers=0)
    with pytest.raises(ValueError, match="leave data.paths empty"):
        build_source(DataConfig(format="shapes", paths=["x"]))
    stream = build_stream(cfg, 64, batch_size=4, seed=0)
    assert stream.source.format == "shapes" and len(stream.source) == 50
    batches = iter(stream)
    first = next(batches)
    # exact renders (no crop), one of the scene's captions
    order = stream._epoch_order(0)
    for j in range(4):
        scene = ShapesDataset(50, "train", 3).scene(int(order[j]))
        assert torch.equal(first["images"][j], to_tensor(W.render(scene)))
        assert first["texts"][j] in W.captions(scene)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = next(batches)
    resumed = build_stream(cfg, 64, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert got["texts"] == expected["texts"] and torch.equal(got["images"], expected["images"])


def test_shapes_training_logs_held_out_psnr(tmp_path):
    """The demo recipe's switches: shapes data, no CLIP (text tower skipped), no GAN, held-out PSNR in the logs."""
    out = tmp_path / "run"
    cfg = TokenizerTrainConfig.load(TINY, ["data.format=shapes", "data.num_workers=0", f"train.output_dir={out}",
                                           "loss.clip=0", "disc.enabled=false", "train.steps=6", "optim.warmup_steps=0", "train.batch_size=4",
                                           "train.save_every=3", "eval.every=3", "eval.shapes_test=8",
                                           "model.gradient_checkpointing=false", "train.grid_every=3"])
    hist = train(cfg)
    assert all(h["clip"] == 0.0 for h in hist) and all("d_loss" not in h for h in hist)
    evals = [r for r in read_jsonl_metrics(out / "logs" / "metrics.jsonl") if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["eval/train_time_s"] == 0.0 < evals[1]["eval/train_time_s"] < evals[2]["eval/train_time_s"]
    assert all(5.0 < r["eval/psnr"] < 60.0 for r in evals) and evals[-1]["eval/psnr"] > evals[0]["eval/psnr"]
    # the text tower got no gradient, so no update: it equals the initial weights
    from tokenizer import UniTok

    trained = UniTok.from_pretrained(out / "model")
    from train.tokenizer.trainer import build_model

    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg)
    for name, p in trained.text_encoder.state_dict().items():
        assert torch.equal(p, init.text_encoder.state_dict()[name]), name
    # resume keeps the training clock
    hist2 = train(TokenizerTrainConfig.load(TINY, [*[f"{k}" for k in (
        "data.format=shapes", "data.num_workers=0", f"train.output_dir={out}", "loss.clip=0", "disc.enabled=false",
        "train.steps=8", "optim.warmup_steps=0", "train.batch_size=4", "train.save_every=3", "eval.every=3", "eval.shapes_test=8",
        "model.gradient_checkpointing=false")]]), resume="latest")
    assert [h["step"] for h in hist2] == [7, 8]
    from train.common.schedule import WarmupCosine

    # the longer train.steps of the resumed run sets the schedule (not the checkpoint's 6-step cosine)
    assert hist2[0]["lr"] == pytest.approx(cfg.optim.lr * WarmupCosine(8, 0, cfg.optim.min_lr_ratio)(6))
    evals = [r for r in read_jsonl_metrics(out / "logs" / "metrics.jsonl") if "eval/psnr" in r]
    assert evals[-1]["step"] == 8 and evals[-1]["eval/train_time_s"] > evals[2]["eval/train_time_s"]


def test_disc_start_step_overrides_the_fraction():
    cfg = TokenizerTrainConfig.load(TINY, ["train.steps=100", "disc.start_step=7"])
    assert cfg.disc_start_step == 7
    assert TokenizerTrainConfig.load(TINY, ["train.steps=100"]).disc_start_step == 50
    with pytest.raises(ConfigError, match="disc.start_step must be >= 0"):
        TokenizerTrainConfig.load(TINY, ["disc.start_step=-1"])
