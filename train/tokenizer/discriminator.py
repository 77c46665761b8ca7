"""Discriminators and GAN losses for tokenizer training.

``DinoDiscriminator`` reproduces UniTok's ``DinoDiscV2`` (``models/discrim.py``, VAR-family): a frozen DINOv2
ViT-S/14 whose blocks (0, 2, 5, 8, 11) feed five small trainable 1-D conv heads, one logit per token. The ViT is
plain torch with the key names of the official ``dinov2_vits14_pretrain.pth``, so that file loads as is.
``PatchDiscriminator`` is a pretrained-free PatchGAN for CPU toy runs.

Both return logits shaped [B, L], so the losses below work with either.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenizer.layers import Attention
from train.tokenizer.diffaug import diff_augment

PathLike = Union[str, os.PathLike]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_KEY_DEPTHS: tuple[int, ...] = (0, 2, 5, 8, 11)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 backbone (facebookresearch/dinov2 ``DinoVisionTransformer``, inference path only)
# ----------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    """Pre-norm block with layer scale: ``x + ls1(attn(norm1 x))``, ``x + ls2(mlp(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
    """DINOv2 ViT without registers, state-dict compatible with the official hub checkpoints.

    ``pos_embed`` covers a ``pos_grid``-square grid (37 for the 518-px training size) and is bicubic-resampled
    to the input grid with DINOv2's ``+0.1`` scale-factor trick, so features match the official model.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 14,
        mlp_hidden: int | None = None,
        pos_grid: int = 37,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.embed_dim, self.patch_size, self.pos_grid = embed_dim, patch_size, pos_grid
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used only by DINOv2's masked training
        hidden = mlp_hidden if mlp_hidden is not None else 4 * embed_dim
        self.blocks = nn.ModuleList(DinoBlock(embed_dim, num_heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # kept for the checkpoint; the discriminator reads pre-norm
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, n_h: int, n_w: int) -> torch.Tensor:
        """Position embeddings for an ``n_h x n_w`` patch grid (DINOv2 ``interpolate_pos_encoding``)."""
        M = self.pos_grid
        if n_h == M and n_w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        # scale_factor (not size) sets the sampling positions, exactly as DINOv2 does; +0.1 avoids float floor errors.
        patch = F.interpolate(patch, scale_factor=((n_h + 0.1) / M, (n_w + 0.1) / M), mode="bicubic")
        if patch.shape[-2:] != (n_h, n_w):
            raise RuntimeError(f"position grid resampled to {tuple(patch.shape[-2:])}, expected {(n_h, n_w)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, n_h * n_w, -1)
        return torch.cat((pos[:, :1], patch), dim=1).to(self.pos_embed.dtype)

    def get_intermediate_layers(
        self, x: torch.Tensor, blocks: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(patch tokens [B, N, C], class token [B, C]) after each block in ``blocks``, before the final norm."""
        B, _, H, W = x.shape
        n_h, n_w = H // self.patch_size, W // self.patch_size
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), self.patch_embed(x)), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(n_h, n_w)
        wanted, out = set(blocks), []
        for i, blk in enumerate(self.blocks[: max(blocks) + 1]):
            tokens = blk(tokens)
            if i in wanted:
                out.append((tokens[:, 1:], tokens[:, 0]))
        return out


# ----------------------------------------------------------------------------------------------------------------
# UniTok DinoDiscV2
# ----------------------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """``(fn(x) + x) / sqrt(2)``: keeps the residual sum at unit scale."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def _conv_gn_lrelu(channels: int, kernel_size: int, groups: int, eps: float) -> nn.Sequential:
    """UniTok ``make_block`` with ``norm_type='gn'`` and no spectral norm."""
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        nn.GroupNorm(groups, channels, eps=eps),
        nn.LeakyReLU(0.2),
    )


class DinoDiscriminator(nn.Module):
    """UniTok's ``DinoDiscV2``: frozen DINOv2 features -> five trainable token-wise heads -> [B, 5 * L] logits.

    The backbone is held outside the module tree (as the reference does): ``parameters()`` and ``state_dict()``
    are the heads plus the ``x_scale``/``x_shift`` buffers, so an optimiser or a ``requires_grad_(True)`` toggle
    can never unfreeze DINO, and checkpoints stay small and match the reference disc layout. ``.to()`` and
    friends still move the backbone. Gradients do flow through the backbone to the input images.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 14,
        mlp_hidden: int | None = None,
        pos_grid: int = 37,
        key_depths: Sequence[int] = DINO_KEY_DEPTHS,
        kernel_size: int = 9,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        init_gain: float = 0.5,
    ) -> None:
        super().__init__()
        key_depths = tuple(int(d) for d in key_depths)
        if not key_depths or min(key_depths) < 0 or max(key_depths) >= depth:
            raise ValueError(f"key_depths {key_depths} must index blocks of a depth-{depth} backbone")
        if embed_dim % norm_groups:
            raise ValueError(f"GroupNorm({norm_groups}) needs a width divisible by it, got {embed_dim}")
        backbone = DinoViT(embed_dim, depth, num_heads, patch_size, mlp_hidden, pos_grid)
        backbone.requires_grad_(False).eval()
        self._backbone = [backbone]  # a list hides it from parameters()/state_dict()/train()
        self.key_depths = key_depths
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # [-1, 1] -> ImageNet normalisation in one affine map: ((x + 1) / 2 - mean) / std.
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1))
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1))
        self.heads = nn.ModuleList(
            nn.Sequential(
                _conv_gn_lrelu(embed_dim, 1, norm_groups, norm_eps),
                ResidualBlock(_conv_gn_lrelu(embed_dim, kernel_size, norm_groups, norm_eps)),
                nn.Conv1d(embed_dim, 1, kernel_size=1),
            )
            for _ in key_depths
        )
        for m in self.heads.modules():  # UniTok disc_init = -0.5: xavier-normal, gain 0.5
            if isinstance(m, nn.Conv1d):
                nn.init.xavier_normal_(m.weight, gain=init_gain)
                nn.init.zeros_(m.bias)

    @property
    def backbone(self) -> DinoViT:
        return self._backbone[0]

    def _apply(self, fn: Any, recurse: bool = True) -> "DinoDiscriminator":
        super()._apply(fn, recurse)
        self.backbone._apply(fn, recurse)
        return self

    def preprocess(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[-1, 1] images -> ImageNet-normalised, sized to a multiple of the patch size.

        Larger inputs are random-cropped or area-resized with equal chance (one choice and one crop per batch, as
        in the reference); inputs smaller than a patch multiple in either side are bicubic-resized.
        """
        x = self.x_scale * x.float() + self.x_shift
        H, W = x.shape[-2:]
        p = self.backbone.patch_size
        nh, nw = (H // p) * p, (W // p) * p
        if nh == 0 or nw == 0:
            raise ValueError(f"input {H}x{W} is smaller than one {p}-px DINO patch")
        if (nh, nw) == (H, W):
            return x
        if H > nh and W > nw:
            dev = generator.device if generator is not None else torch.device("cpu")
            u = torch.rand(3, generator=generator, device=dev).tolist()
            if u[0] <= 0.5:
                top, left = int(u[1] * (H - nh + 1)), int(u[2] * (W - nw + 1))
                return x[..., top : top + nh, left : left + nw]
            return F.interpolate(x, size=(nh, nw), mode="area")
        return F.interpolate(x, size=(nh, nw), mode="bicubic")

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, grad_ckpt: bool = False
    ) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # resampling in fp32, as the reference
            x = self.preprocess(x, generator)
        feats = self.backbone.get_intermediate_layers(x, self.key_depths)
        B = x.shape[0]
        logits = []
        for head, (patch, cls) in zip(self.heads, feats):
            act = (patch.float() + cls.float().unsqueeze(1)).transpose(1, 2)  # B, C, N: class token added to each
            out = checkpoint(head, act, use_reentrant=False) if grad_ckpt and torch.is_grad_enabled() else head(act)
            logits.append(out.view(B, -1))
        return torch.cat(logits, dim=1)

    @classmethod
    def from_pretrained(
        cls,
        dino_path: PathLike,
        num_heads: int | None = None,
        key_depths: Sequence[int] = DINO_KEY_DEPTHS,
        kernel_size: int = 9,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        init_gain: float = 0.5,
    ) -> "DinoDiscriminator":
        """Build the discriminator around an official DINOv2 checkpoint (e.g. ``dinov2_vits14_pretrain.pth``).

        Width, depth, patch size, MLP width and position grid are read from the file; the head count defaults to
        width / 64, which holds for every released DINOv2 (S 6, B 12, L 16, g 24).
        """
        sd = _load_dino_state_dict(dino_path)
        dims = _infer_dino_dims(sd, str(dino_path))
        heads = num_heads if num_heads is not None else max(1, dims["embed_dim"] // 64)
        disc = cls(
            num_heads=heads, key_depths=key_depths, kernel_size=kernel_size, norm_groups=norm_groups,
            norm_eps=norm_eps, init_gain=init_gain, **dims,
        )
        expected = disc.backbone.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            has_registers = any("register" in k for k in unexpected)
            hint = " (register-token DINOv2 variants are not supported)" if has_registers else ""
            raise ValueError(
                f"{dino_path} is not a DINOv2 ViT state dict{hint}: "
                f"missing {missing[:12]}, unexpected {unexpected[:12]}"
            )
        wrong = [
            f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(f"{dino_path}: DINOv2 weights have inconsistent shapes: {wrong[:12]}")
        disc.backbone.load_state_dict(sd, strict=True)
        return disc


def _load_dino_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINOv2 checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read DINOv2 checkpoint {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("teacher", "model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a DINOv2 state dict of tensors (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():  # DDP/teacher-wrapper prefixes
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _infer_dino_dims(sd: Mapping[str, torch.Tensor], where: str) -> dict[str, int]:
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if absent := [k for k in needed if k not in sd]:
        raise ValueError(f"{where} is not a DINOv2 ViT checkpoint: missing {absent}")
    proj = sd["patch_embed.proj.weight"]
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"{where}: pos_embed holds {n_pos} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return dict(
        embed_dim=proj.shape[0], depth=depth, patch_size=proj.shape[-1],
        mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0], pos_grid=grid,
    )


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN (no pretrained weights)
# ----------------------------------------------------------------------------------------------------------------
def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """taming/LlamaGen ``NLayerDiscriminator`` with GroupNorm instead of BatchNorm (batch-size independent).

    ``n_layers`` stride-2 4x4 convs, one stride-1 conv, then a 1-channel conv: one logit per receptive-field
    patch, returned flattened to [B, L] like ``DinoDiscriminator``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = ndf
        for n in range(1, n_layers):
            out = ndf * min(2**n, 8)
            layers += [nn.Conv2d(ch, out, 4, 2, 1, bias=False), _gn(out), nn.LeakyReLU(0.2)]
            ch = out
        out = ndf * min(2**n_layers, 8)
        layers += [nn.Conv2d(ch, out, 4, 1, 1, bias=False), _gn(out), nn.LeakyReLU(0.2), nn.Conv2d(out, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, grad_ckpt: bool = False
    ) -> torch.Tensor:
        """``generator``/``grad_ckpt`` are accepted for interface parity with ``DinoDiscriminator``."""
        return self.main(x).flatten(1)


def build_discriminator(kind: str, image_size: int, dino_path: PathLike | None = None, **kw: Any) -> nn.Module:
    """``"dino"``: UniTok's DINOv2 discriminator (needs ``dino_path``); ``"patch"``: PatchGAN, no weights needed."""
    if kind == "dino":
        if dino_path is None:
            raise ValueError(
                "kind='dino' needs dino_path: the DINOv2 ViT-S/14 checkpoint (dinov2_vits14_pretrain.pth from the "
                "facebookresearch/dinov2 release); use kind='patch' to train without pretrained weights"
            )
        disc = DinoDiscriminator.from_pretrained(dino_path, **kw)
        if image_size < disc.backbone.patch_size:
            raise ValueError(f"image_size {image_size} is smaller than one DINO patch ({disc.backbone.patch_size})")
        return disc
    if kind == "patch":
        if image_size < 16:
            raise ValueError(f"PatchDiscriminator needs images of at least 16 px, got {image_size}")
        # Each stride-2 layer halves the map; keep >= 2x2 logits after the two stride-1 4x4 convs.
        kw.setdefault("n_layers", max(1, min(3, int(math.log2(image_size)) - 3)))
        return PatchDiscriminator(**kw)
    raise ValueError(f"unknown discriminator kind {kind!r}; expected 'dino' or 'patch'")


# ----------------------------------------------------------------------------------------------------------------
# Losses and schedules (UniTok trainer.py / utils/loss.py / main.py / utils/diffaug.py)
# ----------------------------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - real)) + mean(relu(1 + fake))`` (UniTok: ``hinge_loss(real) + hinge_loss(-fake)``)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-mean(D(fake))``."""
    return -logits_fake.mean()


def bcr_loss(
    disc: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    cutout: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Balanced consistency regularisation: ``MSE(D(aug(real)), real_logits) + MSE(D(aug(fake)), fake_logits)``.

    ``aug`` is strong DiffAugment (p = 1, no blur). As in UniTok the target logits are not detached, so both
    sides of each pair are pulled together. Unweighted: multiply by ``bcr`` (4.0) outside.
    """
    aug_real = diff_augment(real, p=1.0, cutout=cutout, generator=generator)
    aug_fake = diff_augment(fake, p=1.0, cutout=cutout, generator=generator)
    loss_real = F.mse_loss(disc(aug_real).float(), real_logits.float())
    return loss_real + F.mse_loss(disc(aug_fake).float(), fake_logits.float())


def adaptive_generator_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, lo: float = 0.015, hi: float = 1e4
) -> torch.Tensor:
    """VQGAN adaptive GAN weight ``||d nll / d W|| / (||d g / d W|| + 1e-6)`` at the decoder's last weight,
    clamped to ``[lo, hi]`` (UniTok ``gada = 1``) and detached. Both graphs are retained for the real backward."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.detach().norm() / (g_adv.detach().norm() + 1e-6)).clamp(lo, hi)


def blur_schedule(step: int, start: int, warmup: int, image_size: int) -> float:
    """Blur sigma for discriminator inputs at ``step``: ``sqrt(H/2)`` when the discriminator starts, falling
    linearly to 0 over ``2 * warmup`` steps (UniTok ``fade_blur_schedule``). 0 before ``start``: no
    discriminator input exists then."""
    if step < start:
        return 0.0
    fade = 1.0 - min(1.0, (step - start) / (2 * warmup)) if warmup > 0 else 0.0
    return math.sqrt(image_size * 0.5) * fade if fade >= 1e-6 else 0.0


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable blur with reflect padding, exactly UniTok's ``DiffAug.aug`` blur.

    Its kernel is ``2 ** -(i / sigma) ** 2`` over ``|i| <= floor(3 sigma)`` (normalised), i.e. a Gaussian whose
    standard deviation is ``sigma / sqrt(2 ln 2)``: ``sigma`` is the half width at half maximum. No-op when the
    radius is 0. The radius is capped at ``min(H, W) - 1`` so reflect padding stays valid on tiny images.
    """
    radius = min(math.floor(sigma * 3), x.shape[-2] - 1, x.shape[-1] - 1)
    if sigma <= 0 or radius < 1:
        return x
    in_dtype, C = x.dtype, x.shape[1]
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp2(-(taps * (1.0 / sigma)).square())
    kernel = kernel / kernel.sum()
    y = F.pad(x.float(), [radius] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return y.to(in_dtype)
