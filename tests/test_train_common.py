"""train/common: config parsing, atomic checkpoints, RNG capture, LR schedule, param groups, grids, CLIP loss."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from train.common.checkpoint import (CheckpointManager, capture_rng_state, load_state, read_meta, restore_rng_state,
                                     save_state)
from train.common.config import ConfigError, apply_overrides, from_dict, load_config, parse_override, to_dict
from train.common.contrastive import clip_loss
from train.common.images import make_grid, save_image_grid
from train.common.optim import build_adamw, param_groups
from train.common.schedule import WarmupCosine, warmup_cosine_scheduler
from train.common.tracking import MetricsWriter, read_jsonl_metrics


# ------------------------------------------------------------------------------------------------ config
@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    steps: int = 10
    name: str | None = None
    paths: list[str] = field(default_factory=list)
    weights: str | list[str] | None = None
    extra: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_from_dict_converts_and_validates():
    cfg = from_dict(Outer, {"steps": 5, "paths": ["a", "b"], "weights": ["x", "y"], "extra": {"k": 1},
                            "inner": {"lr": 3, "betas": [0.5, 0.9], "mode": "b"}, "flag": True})
    assert cfg.steps == 5 and cfg.paths == ["a", "b"] and cfg.weights == ["x", "y"]
    assert cfg.inner.lr == 3.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.betas == (0.5, 0.9) and isinstance(cfg.inner.betas, tuple)
    assert from_dict(Outer, {"inner": {"lr": "1e-4"}}).inner.lr == 1e-4  # YAML reads 1e-4 as a string
    assert from_dict(Outer, {"steps": 1e3}).steps == 1000
    assert to_dict(cfg)["inner"]["betas"] == [0.5, 0.9]


@pytest.mark.parametrize("data, key", [
    ({"stpes": 3}, "'stpes'"),
    ({"inner": {"lrr": 1}}, "'inner.lrr'"),
    ({"steps": "ten"}, "'steps' expects int"),
    ({"steps": 2.5}, "'steps' expects int"),
    ({"flag": "yes"}, "'flag' expects bool"),
    ({"inner": {"lr": "fast"}}, "'inner.lr' expects float"),
    ({"inner": {"betas": [0.9]}}, "'inner.betas' expects 2 values"),
    ({"inner": {"mode": "c"}}, "'inner.mode' must be one of"),
    ({"paths": "a"}, "'paths' expects a list"),
    ({"paths": [1]}, "'paths[0]' expects str"),
    ({"inner": 3}, "section 'inner' must be a mapping"),
])
def test_from_dict_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert key in str(err.value)


def test_overrides_and_yaml(tmp_path):
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=null") == (["x"], None)
    data = apply_overrides({"inner": {"lr": 1.0}}, ["inner.lr=0.5", "steps=7", "inner.mode=b"])
    assert data == {"inner": {"lr": 0.5, "mode": "b"}, "steps": 7}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ninner:\n  lr: 2.0e-4\n")
    cfg = load_config(Outer, path, ["inner.betas=[0.1, 0.2]"])
    assert (cfg.steps, cfg.inner.lr, cfg.inner.betas) == (3, 2e-4, (0.1, 0.2))
    path.write_text("steps: 3\ninner:\n  lr_typo: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'inner\.lr_typo'"):
        load_config(Outer, path)
    with pytest.raises(FileNotFoundError):
        load_config(Outer, tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_atomic_keep_last_and_resolve(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)

    def writer(value):
        def write(d):
            save_state({"value": torch.tensor(value)}, d / "state.pt")
        return write

    for step in (10, 20, 30):
        mgr.save(step, writer(step), meta={"note": "x"})
    assert [s for s, _ in mgr.list()] == [20, 30]  # keep_last=2 pruned step 10
    assert load_state(mgr.latest() / "state.pt")["value"].item() == 30
    assert read_meta(mgr.latest()) == {"step": 30, "note": "x"}

    # A crash while writing leaves only a hidden temp dir: the last complete checkpoint stays "latest".
    def crash(d):
        (d / "partial.pt").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        mgr.save(40, crash)
    assert mgr.latest().name == "step-00000030"
    assert (tmp_path / "ckpt" / ".tmp-step-00000040").exists()
    mgr.save(40, writer(40))  # the next save cleans the stale temp dir
    assert not (tmp_path / "ckpt" / ".tmp-step-00000040").exists()
    mgr.save(40, writer(41))  # re-saving a step replaces it
    assert load_state(mgr.latest() / "state.pt")["value"].item() == 41

    assert mgr.resolve("latest") == mgr.latest() == mgr.resolve("auto")
    assert mgr.resolve(str(tmp_path / "ckpt")) == mgr.latest()
    assert mgr.resolve(str(mgr.list()[0][1])) == mgr.list()[0][1]
    empty = CheckpointManager(tmp_path / "none")
    assert empty.resolve("auto") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        empty.resolve("latest")
    with pytest.raises(FileNotFoundError):
        empty.resolve(str(tmp_path / "nope"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "no manifest"])
@pytest.mark.parametrize("victim", ["accelerate/model.safetensors", "accelerate/optimizer.bin",
                                    "accelerate/random_states_0.pkl", "rank00000.pt", "meta.json"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_previous_intact_one(tmp_path, caplog, victim, damage):
    """Every state file a trainer writes is under the manifest: damaging any one of them in the newest checkpoint
    makes auto/latest resume fall back to the previous checkpoint, saying which file; naming the damaged checkpoint
    explicitly is an error naming the file; the older checkpoint is never touched."""
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)

    def write(d):
        (d / "accelerate").mkdir()
        for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
            (d / "accelerate" / name).write_bytes(bytes(range(256)) * 8)
        save_state({"value": torch.tensor(1)}, d / "rank00000.pt")

    for step in (10, 20):
        mgr.save(step, write)
    newest = mgr.list()[-1][1]
    assert set(json.loads((newest / "manifest.json").read_text())["files"]) == {
        "accelerate/model.safetensors", "accelerate/optimizer.bin", "accelerate/random_states_0.pkl",
        "rank00000.pt", "meta.json"}
    f = newest / (victim if damage != "manifest" else "manifest.json")
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    elif damage == "no manifest":  # a checkpoint is complete only once its manifest is written
        (newest / "manifest.json").unlink()
    else:
        f.write_text("{half a manif")
    with caplog.at_level("WARNING"):
        assert mgr.resolve("auto") == mgr.resolve("latest") == mgr.list()[0][1]
    why = {"manifest": "manifest.json is unreadable", "no manifest": "no manifest.json, so it is incomplete"}.get(
        damage, victim)
    assert "skipping damaged checkpoint step-00000020" in caplog.text and why in caplog.text
    with pytest.raises(ValueError, match=f"checkpoint .*step-00000020 is damaged: .*{why}"):
        mgr.resolve(str(newest))
    for _, path in mgr.list():  # both damaged: nothing to resume from, every reason named
        (path / "rank00000.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="no intact checkpoint.*step-00000020.*step-00000010: rank00000.pt"):
        mgr.resolve("auto")


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_state(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_state(tmp_path / "rng.pt"))  # torch.load(weights_only=True) inside
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------------------------------------ schedule + optim
def test_warmup_cosine_values():
    f = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = WarmupCosine(total_steps=100, warmup_steps=0, min_ratio=0.0, start_step=50)
    assert g(49) == 0.0 and g(50) == pytest.approx(1.0) and g(100) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        WarmupCosine(10, 20)

    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine_scheduler(opt, 110, 10, 0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2 / 11) and lrs[10] == pytest.approx(2.0)
    state = sched.state_dict()
    sched2 = warmup_cosine_scheduler(torch.optim.SGD([p], lr=2.0), 110, 10, 0.1)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 12


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.ln_1 = nn.LayerNorm(4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.ln_weight_matrix = nn.Parameter(torch.zeros(2, 2))  # 2-D but named "ln": no decay (reference rule)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_param_groups_no_decay_rules():
    groups = param_groups(_Toy(), weight_decay=0.02)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["names"]) == ["conv.weight", "proj.weight"]
    assert sorted(no_decay["names"]) == ["conv.bias", "ln_1.bias", "ln_1.weight", "ln_weight_matrix", "logit_scale",
                                         "proj.bias"]
    opt = build_adamw(_Toy(), lr=5e-4, weight_decay=0.02, betas=(0.9, 0.95), eps=1e-6)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    assert sum(len(g["params"]) for g in opt.param_groups) == 8  # the frozen parameter is left out


# ------------------------------------------------------------------------------------------------ images + metrics
def test_image_grid_layout(tmp_path):
    imgs = torch.full((3, 3, 4, 5), -1.0)
    imgs[1] = 1.0
    imgs[2, 0] = 0.0
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 1:6] == 0).all()          # image 0: black
    assert (grid[1:5, 7:12] == 255).all()       # image 1: white
    assert (grid[6:10, 1:6, 0] == 128).all()    # image 2: red channel at 0.0 -> 128
    assert (grid[6:10, 7:12] == 255).all()      # empty cell keeps the padding colour
    path = save_image_grid(imgs, tmp_path / "g" / "grid.png", nrow=2, padding=1)
    assert np.array_equal(np.asarray(Image.open(path)), grid)


def test_metrics_writer(tmp_path):
    w = MetricsWriter(tmp_path / "logs")
    w.scalars(1, {"loss": 2.0, "lr": 1e-3}, prefix="train/")
    w.scalars(2, {"loss": torch.tensor(1.5)}, prefix="train/")
    w.close()
    rows = read_jsonl_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert rows == [{"step": 1, "train/loss": 2.0, "train/lr": 1e-3}, {"step": 2, "train/loss": 1.5}]
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    off = MetricsWriter(tmp_path / "off", enabled=False)
    off.scalars(1, {"x": 1})
    assert not (tmp_path / "off").exists()


# ------------------------------------------------------------------------------------------------ CLIP loss
def test_clip_loss_matches_open_clip_formula():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    loss = clip_loss(img, txt, scale)
    logits = scale * img @ txt.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    # perfectly aligned pairs with a large scale give ~0 loss
    assert clip_loss(txt, txt, torch.tensor(100.0)).item() < 1e-3


def test_model_overrides_reject_a_typo_naming_the_nearest_field():
    """``num_codebook: 4`` used to become a stray attribute while ``num_codebooks`` stayed 8."""
    from mllm import UniTokMLLMConfig
    from train.common.config import ConfigError
    from train.mllm.config import MLLMTrainConfig

    base = ["model.preset=tiny", "model.text_tokenizer=x"]
    with pytest.raises(ConfigError, match=r"model.overrides: 'num_codebook' is not a UniTokMLLMConfig field; "
                                          r"did you mean 'num_codebooks'\?"):
        MLLMTrainConfig.load(None, base + ["model.overrides={num_codebook: 4}"])
    ok = MLLMTrainConfig.load(None, base + ["model.overrides={num_codebooks: 4, rope_theta: 5.0e+5}"])
    assert ok.model.overrides == {"num_codebooks": 4, "rope_theta": 5.0e5}
    with pytest.raises(ValueError, match="'hiden_size' is not a UniTokMLLMConfig field; did you mean 'hidden_size'"):
        UniTokMLLMConfig.from_preset("tiny", hiden_size=64)
    assert UniTokMLLMConfig.from_preset("tiny", num_codebooks=4).num_codebooks == 4


def test_both_trainers_share_one_vocabulary_and_old_names_warn_for_one_release(tmp_path):
    """One name per concept across the tokenizer and MLLM recipes (the shared optim and train sections): the old
    tokenizer names still load, each with a one-line FutureWarning naming the new key; giving both is an error."""
    import warnings

    from train.common.config import ConfigError, LoopSection, OptimSection
    from train.mllm.config import MLLMTrainConfig
    from train.tokenizer.config import TokenizerTrainConfig

    tok, mllm = TokenizerTrainConfig.load(None), MLLMTrainConfig.load(None)
    assert isinstance(tok.optim, OptimSection) and isinstance(mllm.optim, OptimSection)
    assert isinstance(tok.train, LoopSection) and isinstance(mllm.train, LoopSection)
    assert {f for f in vars(tok.model)} >= {"pretrained", "gradient_checkpointing"}
    assert {f for f in vars(mllm.model)} >= {"pretrained", "gradient_checkpointing"}

    recipe = tmp_path / "old.yaml"
    recipe.write_text("model: {preset: tiny, grad_checkpointing: false, init_from: some/dir}\n"
                      "optim: {warmup_fraction: 0.05}\ntrain: {steps: 300}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = TokenizerTrainConfig.load(recipe)
    assert (cfg.model.gradient_checkpointing, cfg.model.pretrained, cfg.optim.warmup_steps) == (False, "some/dir", 15)
    messages = sorted(str(w.message) for w in caught if w.category is FutureWarning)
    assert messages == [
        "config key 'model.grad_checkpointing' is deprecated and will be removed in the next release: use "
        "'model.gradient_checkpointing'",
        "config key 'model.init_from' is deprecated and will be removed in the next release: use 'model.pretrained'",
        "config key 'optim.warmup_fraction' is deprecated and will be removed in the next release: use "
        "'optim.warmup_steps' (here 15)"]
    with pytest.raises(ConfigError, match="'model.grad_checkpointing' and 'model.gradient_checkpointing' are one"):
        TokenizerTrainConfig.load(None, ["model.grad_checkpointing=false", "model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="'optim.warmup_fraction' and 'optim.warmup_steps' are one setting"):
        TokenizerTrainConfig.load(None, ["optim.warmup_fraction=0.1", "optim.warmup_steps=3"])
