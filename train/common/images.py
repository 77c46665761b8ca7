"""Image grids as PNG, with PIL + numpy (no torchvision)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [-1,1] -> uint8 [N,H,W,3] (clamped; rounding like torchvision's ``save_image``)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).add(0.5).clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``images`` ([N,3,H,W], [-1,1]) row-major into one uint8 HWC array with ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got {tuple(images.shape)}")
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, padding=padding)).save(path)
    return path
