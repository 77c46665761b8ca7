"""LPIPS-VGG perceptual loss (Zhang et al. 2018, ``lpips`` package v0.1 "vgg"), in plain torch.

torchvision cannot be a dependency here, so the VGG16 trunk is rebuilt with torchvision's parameter names and
the published weights load one-to-one:

* the UniTok/VAR combined file ``lpips_with_vgg.pth`` (``net.slice{1..5}.{idx}.*`` + ``lin{i}.model.1.weight``,
  plus the duplicate ``lins.{i}.model.1.weight`` that the reference's ``nn.ModuleList`` alias writes), or
* torchvision's ``vgg16-397923af.pth`` (``features.*``, ``classifier.*``) together with the lpips package's
  ``weights/v0.1/vgg.pth`` heads (``lin{i}.model.1.weight``).

One numerical choice: features are normalised as ``x / (sqrt(sum x^2 + sqrt_eps) + 1e-10)``. ``sqrt_eps = 1e-9``
(default) is what UniTok's ``utils/lpips.py`` trains with; ``sqrt_eps = 0`` is the lpips package formula. The two
differ by about ``1e-9 / |feature|^2`` relative, far below anything a loss can see.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

# torchvision ``vgg16().features``: conv indices and widths; a ReLU follows every conv, max-pools sit at 4, 9, 16, 23.
_VGG16_CONVS: tuple[tuple[int, int, int], ...] = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)
_VGG16_POOLS: tuple[int, ...] = (4, 9, 16, 23)
# lpips ``pn.vgg16`` splits features into [0:4], [4:9], [9:16], [16:23], [23:30]; each slice ends on the tapped ReLU.
_SLICE_BOUNDS: tuple[tuple[int, int], ...] = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Keys that published files carry but that hold no learned weights we need.
_IGNORED_KEY = re.compile(
    r"(^|\.)(classifier\.\d+\.(weight|bias)|shift|scale|scale_inv|scaling_layer\.(shift|scale)|num_batches_tracked)$"
)
_SLICE_KEY = re.compile(r"(?:^|\.)net\.slice([1-5])\.(\d+)\.(weight|bias)$")
_FEATURE_KEY = re.compile(r"(?:^|\.)features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"(?:^|\.)lin(?:s\.)?([0-4])\.model\.([01])\.weight$")


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features`` (up to relu5_3) returning the five LPIPS taps.

    ``features`` is an ``nn.Sequential`` indexed exactly like torchvision's, so ``features.{idx}.weight`` keys
    from ``vgg16-397923af.pth`` load without renaming.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        convs = {idx: (cin, cout) for idx, cin, cout in _VGG16_CONVS}
        idx = 0
        while idx < _SLICE_BOUNDS[-1][1]:
            if idx in convs:
                layers += [nn.Conv2d(*convs[idx], kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                idx += 2
            elif idx in _VGG16_POOLS:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                idx += 1
            else:  # pragma: no cover - the table above is complete
                raise AssertionError(f"no VGG16 layer at index {idx}")
        self.features = nn.Sequential(*layers)
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, so an untrained trunk still has sane activations
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for start, end in _SLICE_BOUNDS:
            for layer in self.features[start:end]:
                x = layer(x)
            taps.append(x)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; the next slice starts with a max-pool
        return taps


class ScalingLayer(nn.Module):
    """lpips ``ScalingLayer``: maps [-1, 1] images to the statistics the VGG trunk was trained on."""

    def __init__(self) -> None:
        super().__init__()
        # Non-persistent: constants, not weights, so state_dict() holds only what the published files hold.
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """lpips ``NetLinLayer``: Dropout then a bias-free 1x1 conv to one channel (keys ``model.1.weight``)."""

    def __init__(self, chn_in: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, kernel_size=1, bias=False))
        # The published heads are non-negative (lpips clamps them while training); a random head follows suit so
        # that an untrained LPIPS is still a distance (>= 0).
        with torch.no_grad():
            self.model[1].weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_tensor(x: torch.Tensor, sqrt_eps: float = 1e-9, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise every feature vector over channels (dim 1)."""
    return x / (x.square().sum(dim=1, keepdim=True).add(sqrt_eps).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two image batches in [-1, 1].

    Always frozen and in eval mode: it is a fixed loss network, and its Dropout must never fire.
    ``reduction="none"`` returns ``[B, 1, 1, 1]`` like the lpips package; ``"mean"`` returns the batch mean,
    which equals UniTok's scalar ``LPIPS(inp, rec)``.
    """

    def __init__(self, reduction: str = "none", sqrt_eps: float = 1e-9) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.sqrt_eps = sqrt_eps
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self) -> tuple[NetLinLayer, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def train(self, mode: bool = True) -> "LPIPS":
        """Ignore ``train()``: a parent module switching to training must not turn on the heads' Dropout."""
        return super().train(False)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        reduction = self.reduction if reduction is None else reduction
        _check_reduction(reduction)
        if in0.shape != in1.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(in0.shape)} and {tuple(in1.shape)}")
        B = in0.shape[0]
        # One trunk pass over both batches (as UniTok does): half the kernel launches of two passes.
        feats = self.net(self.scaling_layer(torch.cat((in0, in1), dim=0)))
        val = None
        for feat, lin in zip(feats, self.lins):
            f0 = normalize_tensor(feat[:B], self.sqrt_eps)
            f1 = normalize_tensor(feat[B:], self.sqrt_eps)
            layer = lin((f0 - f1).square()).mean(dim=(2, 3), keepdim=True)
            val = layer if val is None else val + layer
        return val.mean() if reduction == "mean" else val

    @classmethod
    def from_pretrained(
        cls, path_or_paths: PathLike | Sequence[PathLike], reduction: str = "none", sqrt_eps: float = 1e-9
    ) -> "LPIPS":
        """Load LPIPS-VGG from one combined file or from a (torchvision VGG16, lpips heads) pair of files.

        Every file is read with ``torch.load(weights_only=True)`` (or safetensors); any prefix before the
        recognised key tails (``module.``, ``perceptual_loss.``, ``lpips.`` ...) is ignored.
        """
        paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
        if not paths:
            raise ValueError("LPIPS.from_pretrained needs at least one weight file")
        merged: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for path in paths:
            for key, value in _convert_lpips_state_dict(_load_state_dict(path), str(path)).items():
                if key in merged and not torch.equal(merged[key], value):
                    raise ValueError(f"LPIPS weight {key!r} is given with different values in {origin[key]} and {path}")
                merged[key] = value
                origin[key] = str(path)
        model = cls(reduction=reduction, sqrt_eps=sqrt_eps)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(merged))
        if missing:
            raise ValueError(
                f"LPIPS weights incomplete: missing {_short(missing)} after reading {[str(p) for p in paths]}. "
                "Pass either the combined lpips_with_vgg.pth, or torchvision's vgg16 file together with the lpips "
                "vgg.pth heads."
            )
        extra = sorted(set(merged) - set(expected))
        if extra:
            raise ValueError(f"LPIPS weights hold layers this VGG16 trunk does not have: {_short(extra)}")
        bad = [f"{k}: file {tuple(merged[k].shape)} vs model {tuple(expected[k].shape)}"
               for k in expected if merged[k].shape != expected[k].shape]
        if bad:
            raise ValueError(f"LPIPS weights have wrong shapes: {_short(bad)}")
        model.load_state_dict(merged, strict=True)
        model.requires_grad_(False)
        return model.eval()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def _short(items: Sequence[str], limit: int = 12) -> str:
    items = list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _load_state_dict(path: PathLike) -> Mapping[str, torch.Tensor]:
    """Read a flat tensor dict, with clear errors for absent, truncated or non-state-dict files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with arbitrary objects, not a torch file at all
        raise ValueError(f"could not read weight file {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return obj


def _convert_lpips_state_dict(sd: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Map any published LPIPS/VGG key layout onto this module's keys (``net.features.*``, ``lin{i}.model.1.*``)."""
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []

    def put(new_key: str, old_key: str) -> None:
        value = sd[old_key]
        if new_key in out and not torch.equal(out[new_key], value):
            raise ValueError(f"{where}: keys for {new_key!r} disagree (e.g. {old_key!r})")
        out[new_key] = value

    for key in sd:
        if m := _SLICE_KEY.search(key):
            slice_id, idx = int(m.group(1)), int(m.group(2))
            lo, hi = _SLICE_BOUNDS[slice_id - 1]
            if not lo <= idx < hi:
                raise ValueError(f"{where}: key {key!r} puts layer {idx} in slice{slice_id}, which holds [{lo}, {hi})")
            put(f"net.features.{idx}.{m.group(3)}", key)
        elif m := _FEATURE_KEY.search(key):
            put(f"net.features.{m.group(1)}.{m.group(2)}", key)
        elif m := _LIN_KEY.search(key):
            # model.1 when saved with Dropout (lpips default, UniTok's Identity); model.0 when saved without.
            put(f"lin{m.group(1)}.model.1.weight", key)
        elif not _IGNORED_KEY.search(key):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys for LPIPS-VGG: {_short(sorted(unexpected))}")
    return out
