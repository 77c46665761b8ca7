"""Training-only tokenizer losses: LPIPS-VGG, DiffAugment, DINOv2 / PatchGAN discriminators, GAN losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.tokenizer.diffaug import color, cutout_mask, diff_augment, translate
from train.tokenizer.discriminator import (
    DinoDiscriminator,
    DinoViT,
    PatchDiscriminator,
    adaptive_generator_weight,
    bcr_loss,
    blur_schedule,
    build_discriminator,
    gaussian_blur,
    hinge_d_loss,
    hinge_g_loss,
)
from metrics.lpips import LPIPS, VGG16Features, normalize_tensor

VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
SLICES = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30))]


# ------------------------------------------------------------------------------------------------ LPIPS
@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def _combined_unitok_sd(model: LPIPS, prefix: str = "") -> dict[str, torch.Tensor]:
    """The lpips_with_vgg.pth layout: lpips ``pn.vgg16`` slices plus heads saved twice (``lin{i}`` and ``lins.{i}``)."""
    sd = {}
    for s, idxs in SLICES:
        for i in idxs:
            if i in VGG_CONVS:
                for p in ("weight", "bias"):
                    sd[f"{prefix}net.slice{s}.{i}.{p}"] = model.state_dict()[f"net.features.{i}.{p}"].clone()
    for i in range(5):
        w = model.state_dict()[f"lin{i}.model.1.weight"].clone()
        sd[f"{prefix}lin{i}.model.1.weight"] = w
        sd[f"{prefix}lins.{i}.model.1.weight"] = w.clone()
    return sd


def _torchvision_sd(model: LPIPS) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {f"features.{i}.{p}": sd[f"net.features.{i}.{p}"] for i in VGG_CONVS for p in ("weight", "bias")}


def test_vgg_trunk_matches_torchvision_layout():
    vgg = VGG16Features()
    expected = {f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    assert set(vgg.state_dict()) == expected
    assert vgg.state_dict()["features.0.weight"].shape == (64, 3, 3, 3)
    assert vgg.state_dict()["features.10.weight"].shape == (256, 128, 3, 3)
    assert vgg.state_dict()["features.28.weight"].shape == (512, 512, 3, 3)
    taps = vgg(torch.zeros(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    # Taps are post-ReLU: relu1_2 of a conv stack that is just conv0 -> relu -> conv2 -> relu.
    x = torch.randn(1, 3, 16, 16)
    f = vgg.features
    assert torch.allclose(vgg(x)[0], F.relu(f[2](F.relu(f[0](x)))), atol=1e-6)


def test_lpips_formula(lpips_model, images):
    x, y = images
    model = LPIPS(sqrt_eps=0.0)
    model.load_state_dict(lpips_model.state_dict())
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = model.net((x - shift) / scale), model.net((y - shift) / scale)
    expected = torch.zeros(2)
    for i, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = model.state_dict()[f"lin{i}.model.1.weight"].view(-1)
        expected += torch.einsum("bchw,c->bhw", (a - b) ** 2, w).mean(dim=(1, 2))
    out = model(x, y)
    assert out.shape == (2, 1, 1, 1)
    assert torch.allclose(out.view(-1), expected, rtol=1e-5, atol=1e-7)
    # UniTok's sqrt(sum + 1e-9) differs from the lpips package only negligibly.
    assert torch.allclose(lpips_model(x, y), out, rtol=1e-5)
    assert torch.allclose(normalize_tensor(torch.zeros(1, 4, 1, 1)), torch.zeros(1, 4, 1, 1))


def test_lpips_is_a_distance_with_gradients(lpips_model, images):
    x, y = images
    assert torch.equal(lpips_model(x, x), torch.zeros(2, 1, 1, 1))
    d = lpips_model(x, y)
    assert (d > 0).all()
    assert torch.allclose(d, lpips_model(y, x), rtol=1e-5, atol=1e-7)
    assert torch.allclose(lpips_model(x, y, reduction="mean"), d.mean())
    assert LPIPS(reduction="mean").reduction == "mean"
    rec = y.clone().requires_grad_(True)
    lpips_model(x, rec, reduction="mean").backward()
    assert rec.grad is not None and torch.isfinite(rec.grad).all() and rec.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_model.parameters())
    with pytest.raises(ValueError, match="reduction"):
        lpips_model(x, y, reduction="sum")
    with pytest.raises(ValueError, match="same shape"):
        lpips_model(x, y[:1])


def test_lpips_stays_in_eval_mode(lpips_model, images):
    x, y = images
    parent = nn.ModuleDict({"lp": lpips_model}).train()
    assert not lpips_model.training and not lpips_model.lin0.model[0].training
    assert torch.equal(parent["lp"](x, y), parent["lp"](x, y))  # dropout never fires


def test_lpips_loads_unitok_combined_file(lpips_model, images, tmp_path):
    x, y = images
    ref = lpips_model(x, y)
    for prefix in ("", "perceptual_loss.", "module.lpips."):
        path = tmp_path / f"lpips_with_vgg{prefix}.pth"
        torch.save(_combined_unitok_sd(lpips_model, prefix), path)
        loaded = LPIPS.from_pretrained(path)
        assert torch.equal(loaded(x, y), ref)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # Our own state dict and safetensors round-trip too.
    from safetensors.torch import save_file

    save_file(lpips_model.state_dict(), str(tmp_path / "lpips.safetensors"))
    assert torch.equal(LPIPS.from_pretrained(tmp_path / "lpips.safetensors")(x, y), ref)


def test_lpips_loads_torchvision_plus_heads_pair(lpips_model, images, tmp_path):
    x, y = images
    vgg = _torchvision_sd(lpips_model)
    vgg.update({"classifier.0.weight": torch.zeros(8, 4), "classifier.0.bias": torch.zeros(8)})
    vgg["classifier.6.weight"] = torch.zeros(2, 8)
    heads = {f"lin{i}.model.1.weight": lpips_model.state_dict()[f"lin{i}.model.1.weight"] for i in range(5)}
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = LPIPS.from_pretrained([tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"], reduction="mean")
    assert torch.equal(loaded(x, y), lpips_model(x, y).mean())
    # lpips saved with use_dropout=False puts the conv at model.0
    torch.save({k.replace("model.1", "model.0"): v for k, v in heads.items()}, tmp_path / "vgg_nodrop.pth")
    loaded = LPIPS.from_pretrained([tmp_path / "vgg16-397923af.pth", tmp_path / "vgg_nodrop.pth"])
    assert torch.equal(loaded(x, y), lpips_model(x, y))


def test_lpips_bad_files_raise_clear_errors(lpips_model, tmp_path):
    vgg = _torchvision_sd(lpips_model)
    torch.save(vgg, tmp_path / "vgg_only.pth")
    with pytest.raises(ValueError, match=r"missing lin0\.model\.1\.weight"):
        LPIPS.from_pretrained(tmp_path / "vgg_only.pth")
    sd = _combined_unitok_sd(lpips_model)
    torch.save({**sd, "decoder.conv_out.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys.*decoder\.conv_out\.weight"):
        LPIPS.from_pretrained(tmp_path / "extra.pth")
    bad = dict(sd)
    bad["net.slice1.5.weight"] = bad.pop("net.slice2.5.weight")
    torch.save(bad, tmp_path / "bad_slice.pth")
    with pytest.raises(ValueError, match="slice1"):
        LPIPS.from_pretrained(tmp_path / "bad_slice.pth")
    small = dict(sd)
    small["lin0.model.1.weight"] = small["lins.0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"lin0\.model\.1\.weight: file \(1, 32, 1, 1\)"):
        LPIPS.from_pretrained(tmp_path / "small.pth")
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="could not read weight file"):
        LPIPS.from_pretrained(tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError):
        LPIPS.from_pretrained(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------ DiffAugment
def test_translate_shifts_with_zero_fill():
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).view(2, 1, 6, 7) + 1
    out = translate(x, torch.tensor([2, -1]), torch.tensor([-3, 0]))
    exp = torch.zeros_like(x)
    exp[0, :, 0:4, 3:7] = x[0, :, 2:6, 0:4]  # out[i, j] = x[i + 2, j - 3]
    exp[1, :, 1:6, :] = x[1, :, 0:5, :]  # out[i, j] = x[i - 1, j]
    assert torch.equal(out, exp)


def test_color_ops_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g)
    half = torch.full((2,), 0.5)
    assert torch.allclose(color(x, half, half, half), x, atol=1e-6)  # +0, x1, x1
    assert torch.allclose(color(x, torch.ones(2), half, half), x + 0.5, atol=1e-6)
    grey = color(x, half, torch.zeros(2), half)
    assert torch.allclose(grey, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(color(x, half, half, torch.zeros(2)), (x - m) * 0.5 + m, atol=1e-6)


def test_cutout_square_position_and_size():
    m = cutout_mask(2, 10, 10, 0.2, torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.5]))
    assert m.shape == (2, 10, 10)
    # size round(10 * 0.2) = 2; centre floor(u * 11); square [c - 1, c + 1) clipped to the image.
    assert (m[0] == 0).nonzero().tolist() == [[0, 0]]
    assert (m[1] == 0).nonzero().tolist() == [[4, 4], [4, 5], [5, 4], [5, 5]]


def test_diff_augment_draws_like_the_reference():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = diff_augment(x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert (torch.rand(3, generator=g) <= 1.0).all()
    u = torch.rand(7, 3, generator=g)
    d = round(16 * 0.125)
    sh, sw = (u[0] * (2 * d + 1)).floor().long() - d, (u[1] * (2 * d + 1)).floor().long() - d
    assert sh.abs().max() <= 2 and sw.abs().max() <= 2
    exp = translate(x, sh, sw)
    exp = color(exp, u[2], u[3], u[4])
    mask = cutout_mask(3, 16, 16, 0.2, u[5], u[6])
    holes = (mask == 0).flatten(1).sum(1)
    assert ((holes >= 1) & (holes <= 9)).all()  # a round(16 * 0.2) = 3 square hole, clipped at the border
    assert torch.equal(out, exp * mask.unsqueeze(1))
    assert (out.permute(1, 0, 2, 3)[:, mask == 0] == 0).all()


def test_diff_augment_determinism_probability_and_dtype():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = diff_augment(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, diff_augment(x, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, diff_augment(x, generator=torch.Generator().manual_seed(4)))
    assert diff_augment(x, p=0.0) is x
    assert diff_augment(x, policy="") is x
    only_cut = diff_augment(x, policy="cutout", cutout=0.25, generator=torch.Generator().manual_seed(0))
    kept = only_cut != 0
    assert torch.equal(only_cut[kept], x[kept]) and (~kept).sum() == 2 * 3 * 16  # 4x4 hole per image
    assert diff_augment(x.bfloat16(), generator=torch.Generator().manual_seed(3)).dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)
    diff_augment(xg, generator=torch.Generator().manual_seed(3)).sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, policy="color,flip")


# ------------------------------------------------------------------------------------------------ DINOv2 discriminator
TINY = dict(embed_dim=64, depth=12, num_heads=2)


def _official_dino_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                 "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                 "mlp.fc2.bias", "ls2.gamma"]
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in per_block}


def _random_dino_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = DinoViT(**TINY).state_dict()
    return {
        k: torch.randn_like(v) * (0.3 if v.ndim > 1 else 0.1) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
        for k, v in sd.items()
    }


def _reference_dino_features(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks, heads: int) -> list[torch.Tensor]:
    """facebookresearch/dinov2 ``get_intermediate_layers(norm=False)``, written out op by op."""
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    B, N, C = t.shape
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1)
    M, n = 37, int(math.sqrt(N))
    pp = sd["pos_embed"][:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
    pp = F.interpolate(pp, scale_factor=((n + 0.1) / M, (n + 0.1) / M), mode="bicubic")
    pp = pp.permute(0, 2, 3, 1).reshape(1, -1, C)
    t = t + torch.cat([sd["pos_embed"][:, :1], pp], 1)
    outs = []
    for i in range(max(blocks) + 1):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(t, (C,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
        qkv = qkv.reshape(B, N + 1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] * (C // heads) ** -0.5) @ qkv[1].transpose(-2, -1)).softmax(-1)
        h = F.linear((att @ qkv[2]).transpose(1, 2).reshape(B, N + 1, C), p("attn.proj.weight"), p("attn.proj.bias"))
        t = t + h * p("ls1.gamma")
        h = F.layer_norm(t, (C,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        h = F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
        h = F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + h * p("ls2.gamma")
        if i in blocks:
            outs.append(t[:, 1:] + t[:, :1])  # patch tokens + class token, as DinoDiscV2 feeds its heads
    return outs


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    sd = _random_dino_sd()
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return str(path), sd


def test_dino_backbone_key_layout():
    vit = DinoViT(**TINY)
    assert set(vit.state_dict()) == _official_dino_keys(12)
    assert vit.pos_embed.shape == (1, 1370, 64) and vit.mask_token.shape == (1, 64)
    full = DinoViT()  # ViT-S/14 at 518 px
    assert full.pos_embed.shape == (1, 1370, 384) and full.blocks[0].mlp.fc1.weight.shape == (1536, 384)
    assert sum(p.numel() for p in full.parameters()) == 22_056_576  # official dinov2_vits14 parameter count


def test_dino_loads_official_layout_and_matches_reference_math(dino_file):
    path, sd = dino_file
    disc = DinoDiscriminator.from_pretrained(path, num_heads=2)
    vit = disc.backbone
    assert (vit.embed_dim, len(vit.blocks), vit.patch_size, vit.pos_grid) == (64, 12, 14, 37)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in sd.items())
    x = torch.rand(2, 3, 42, 42) * 2 - 1  # a multiple of 14: no crop/resize, 3x3 patches
    xn = disc.x_scale * x + disc.x_shift
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(xn, ((x + 1) / 2 - mean) / std, atol=1e-6)
    ref = _reference_dino_features(sd, xn, (0, 2, 5, 8, 11), heads=2)
    got = [p + c.unsqueeze(1) for p, c in vit.get_intermediate_layers(xn, (0, 2, 5, 8, 11))]
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-4, rtol=1e-4)
    expected_logits = torch.cat([h(f.transpose(1, 2)).view(2, -1) for h, f in zip(disc.heads, ref)], 1)
    assert torch.allclose(disc(x), expected_logits, atol=1e-4, rtol=1e-4)
    # At the 37x37 training grid the position table is used as is.
    assert vit.interpolate_pos_encoding(37, 37) is vit.pos_embed


def test_dino_discriminator_shapes_and_frozen_backbone():
    torch.manual_seed(0)
    disc = DinoDiscriminator(**TINY)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    out = disc(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5 * 4)  # 32 -> 28 px -> 2x2 tokens per head
    out.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator loss needs this path
    assert all(p.grad is None and not p.requires_grad for p in disc.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    # Only heads are parameters/state; toggling requires_grad (as UniTok's trainer does) cannot unfreeze DINO.
    assert {id(p) for p in disc.parameters()} == {id(p) for p in disc.heads.parameters()}
    assert {k.split(".")[0] for k in disc.state_dict()} == {"x_scale", "x_shift", "heads"}
    disc.requires_grad_(True).train()
    assert not any(p.requires_grad for p in disc.backbone.parameters()) and not disc.backbone.training
    disc.to(torch.float64)
    assert disc.backbone.pos_embed.dtype == torch.float64
    head = disc.heads[0]
    assert isinstance(head[0][1], nn.GroupNorm) and head[0][1].num_groups == 32
    assert head[1].fn[0].kernel_size == (9,) and head[1].fn[0].padding_mode == "circular"
    assert head[2].out_channels == 1


def test_dino_preprocess_crop_or_area():
    torch.manual_seed(0)
    disc = DinoDiscriminator(**TINY)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    xn = disc.x_scale * x + disc.x_shift
    area = F.interpolate(xn, size=(28, 28), mode="area")
    crops = {(i, j): xn[..., i:i + 28, j:j + 28] for i in range(5) for j in range(5)}
    kinds = set()
    for seed in range(12):
        y = disc.preprocess(x, torch.Generator().manual_seed(seed))
        assert y.shape == (1, 3, 28, 28)
        if torch.equal(y, area):
            kinds.add("area")
        else:
            assert any(torch.equal(y, c) for c in crops.values())
            kinds.add("crop")
    assert kinds == {"area", "crop"}
    assert disc.preprocess(x[..., :28, :28]).shape == (1, 3, 28, 28)
    assert disc.preprocess(torch.zeros(1, 3, 28, 30)).shape == (1, 3, 28, 28)  # one side exact: bicubic


def test_dino_bad_files_raise_clear_errors(dino_file, tmp_path):
    _, sd = dino_file
    torch.save({k: v for k, v in sd.items() if k != "blocks.3.ls1.gamma"}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks\.3\.ls1\.gamma'\]"):
        DinoDiscriminator.from_pretrained(tmp_path / "missing.pth", num_heads=2)
    torch.save({**sd, "register_tokens": torch.zeros(1, 4, 64)}, tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="register"):
        DinoDiscriminator.from_pretrained(tmp_path / "reg.pth", num_heads=2)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "not_dino.pth")
    with pytest.raises(ValueError, match="not a DINOv2"):
        DinoDiscriminator.from_pretrained(tmp_path / "not_dino.pth")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="could not read DINOv2 checkpoint"):
        DinoDiscriminator.from_pretrained(tmp_path / "trunc.pth")
    with pytest.raises(FileNotFoundError):
        DinoDiscriminator.from_pretrained(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------ PatchGAN + factory
def test_patch_discriminator_and_factory(dino_file):
    for size in (16, 32, 64):
        disc = build_discriminator("patch", size, ndf=16)
        out = disc(torch.zeros(2, 3, size, size))
        assert out.shape == (2, 36)  # 6x6 patch logits at every size thanks to the n_layers choice
    assert isinstance(build_discriminator("patch", 32), PatchDiscriminator)
    assert isinstance(build_discriminator("dino", 32, dino_path=dino_file[0], num_heads=2), DinoDiscriminator)
    with pytest.raises(ValueError, match="dino_path"):
        build_discriminator("dino", 256)
    with pytest.raises(ValueError, match="unknown discriminator kind"):
        build_discriminator("stylegan", 256)


# ------------------------------------------------------------------------------------------------ losses and schedules
def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5, -1.0]])
    fake = torch.tensor([[-2.0, 0.0, 1.5]])
    # relu(1 - real) = [0, .5, 2] -> 5/6 ; relu(1 + fake) = [0, 1, 2.5] -> 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)
    assert hinge_d_loss(torch.full((2, 4), 3.0), torch.full((2, 4), -3.0)).item() == 0.0


def test_adaptive_generator_weight_by_hand():
    W = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # ||W|| = 5
    for k, expected in ((1.0, 30 / (2 + 1e-6)), (1e5, 0.015), (1e-9, 1e4)):
        nll = 3 * (W**2).sum()  # grad 6W, norm 30
        g = k * W.sum()  # grad k * ones, norm 2k
        w = adaptive_generator_weight(nll, g, W)
        assert not w.requires_grad
        assert w.item() == pytest.approx(expected, rel=1e-6)
        (nll + w * g).backward()  # graphs were retained
    assert W.grad is not None


def test_bcr_loss():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=8, n_layers=1)
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    rl, fl = disc(real), disc(fake)
    loss = bcr_loss(disc, real, fake, rl, fl, cutout=0.2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ar, af = diff_augment(real, p=1.0, cutout=0.2, generator=g), diff_augment(fake, p=1.0, cutout=0.2, generator=g)
    expected = ((disc(ar) - rl) ** 2).mean() + ((disc(af) - fl) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-6) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    zero = lambda t: t.sum(dim=(1, 2, 3), keepdim=False)[:, None] * 0  # noqa: E731
    assert bcr_loss(zero, real, fake, torch.zeros(2, 1), torch.zeros(2, 1)).item() == 0.0


def test_blur_schedule_values():
    s0 = math.sqrt(128)
    assert blur_schedule(99, start=100, warmup=10, image_size=256) == 0.0
    assert blur_schedule(100, 100, 10, 256) == pytest.approx(s0)
    assert blur_schedule(105, 100, 10, 256) == pytest.approx(0.75 * s0)
    assert blur_schedule(110, 100, 10, 256) == pytest.approx(0.5 * s0)
    assert blur_schedule(120, 100, 10, 256) == 0.0
    assert blur_schedule(500, 100, 10, 256) == 0.0
    assert blur_schedule(100, 100, 0, 256) == 0.0


def test_gaussian_blur_kernel():
    x = torch.rand(1, 2, 8, 8)
    assert gaussian_blur(x, 0.0) is x and gaussian_blur(x, 0.3) is x  # radius floor(3 sigma) = 0
    delta = torch.zeros(1, 1, 21, 21)
    delta[..., 10, 10] = 1.0
    sigma = 1.5  # radius 4
    out = gaussian_blur(delta, sigma)
    k = torch.tensor([2.0 ** -((i / sigma) ** 2) for i in range(-4, 5)])
    k = k / k.sum()
    exp = torch.zeros(21, 21)
    exp[6:15, 6:15] = torch.outer(k, k)
    assert torch.allclose(out[0, 0], exp, atol=1e-7)
    const = torch.full((1, 3, 12, 12), 0.7)
    assert torch.allclose(gaussian_blur(const, 3.0), const, atol=1e-6)  # reflect padding keeps flat images flat
    assert gaussian_blur(torch.rand(1, 3, 4, 4), 11.3).shape == (1, 3, 4, 4)  # radius capped for tiny images
    assert gaussian_blur(const.bfloat16(), 1.0).dtype == torch.bfloat16
