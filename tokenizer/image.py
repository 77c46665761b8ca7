"""Image I/O and the official pre-processing, with PIL + numpy (no torchvision).

``preprocess`` reproduces the reference ``inference.py`` transform: resize the shorter side to
``int(size * 1.125)`` with PIL bilinear (torchvision's default on PIL images), centre-crop ``size``, map to [-1, 1].
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


PIXEL_LIMIT_ENV = "UNITOK_MAX_IMAGE_PIXELS"
DEFAULT_PIXEL_LIMIT = 8192 * 8192  # far above any training size; a decompression bomb is far above this
TRANSPARENT_BACKGROUND = (255, 255, 255)  # what transparent pixels become (white, as browsers show them)


def pixel_limit() -> int:
    """The largest image (width x height) we decode: ``$UNITOK_MAX_IMAGE_PIXELS`` or 64 M pixels."""
    raw = os.environ.get(PIXEL_LIMIT_ENV)
    try:
        limit = int(raw) if raw else DEFAULT_PIXEL_LIMIT
    except ValueError:
        raise ValueError(f"{PIXEL_LIMIT_ENV}={raw!r} is not a whole number of pixels") from None
    if limit < 1:
        raise ValueError(f"{PIXEL_LIMIT_ENV} must be >= 1, got {limit}")
    return limit


def open_image(source, name: str) -> Image.Image:
    """Open a path or file object, refuse more than :func:`pixel_limit` pixels before decoding them, decode, and
    return :func:`to_rgb` of it. PIL's errors are left to the caller (they differ per format)."""
    limit = pixel_limit()
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {name} has {bomb_pixels(err)} pixels, over the limit of "
                         f"{min(limit, 2 * (Image.MAX_IMAGE_PIXELS or 0)) or limit} (to allow more, raise "
                         f"{PIXEL_LIMIT_ENV} and, past PIL's own guard, PIL.Image.MAX_IMAGE_PIXELS)") from None
    with opened as img:
        if img.width * img.height > limit:
            raise ValueError(f"image {name} is {img.width}x{img.height} = {img.width * img.height} pixels, over the "
                             f"limit of {limit} (set {PIXEL_LIMIT_ENV} to allow more)")
        img.load()
        return to_rgb(img)


def bomb_pixels(err: Exception) -> int | str:
    """The pixel count in PIL's own refusal (its process-wide guard, twice ``Image.MAX_IMAGE_PIXELS``, which we leave
    as the application set it): the header is read, the image never decoded."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return int(found.group(1)) if found else "too many"


def image_pixels(source) -> int | str:
    """Width x height from an image's header (nothing decoded), PIL's guard included."""
    try:
        with Image.open(source) as img:
            return img.width * img.height
    except Image.DecompressionBombError as err:
        return bomb_pixels(err)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """RGB as the picture looks: EXIF orientation applied, 16-bit samples scaled (PIL's convert clips them, so
    mid-grey would turn white), transparency composited on ``background``; CMYK, palette and grey via PIL."""
    if img.mode == "RGB" and 0x0112 not in img.getexif():  # the common case: no copy (this runs once per image read)
        return img
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (PNG opens as I;16, older PIL as I)
        arr = np.asarray(img).astype(np.int64)
        img = Image.fromarray(((arr + 128) // 257).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        canvas = Image.new("RGBA", img.size, (*background, 255))
        canvas.alpha_composite(img.convert("RGBA"))
        img = canvas
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB (:func:`open_image`), with a clear error for a missing, corrupt or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        return open_image(path, str(path))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def resize_shorter(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side -> size, aspect kept (long side truncated)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop``: offsets rounded like ``int(round((h - size) / 2))``."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
    return x.add(x).sub_(1)


def preprocess(img: Image.Image | str | Path, size: int, resize_ratio: float = 1.125) -> torch.Tensor:
    """The reference inference transform: [3, size, size] in [-1, 1]."""
    if not isinstance(img, Image.Image):
        img = load_image(img)
    img = resize_shorter(to_rgb(img), int(size * resize_ratio))
    return to_tensor(center_crop(img, size))


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def make_grid(images: Sequence[Image.Image] | torch.Tensor, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (PIL list or [B, 3, H, W] tensor in [-1, 1]) into one picture."""
    if isinstance(images, torch.Tensor):
        images = [to_pil(x) for x in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of ``fill`` (the MLLM's understanding input)."""
    img = to_rgb(img)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_padded(img: Image.Image | str | Path, size: int) -> torch.Tensor:
    """The MLLM understanding transform (reference ``model_vqa_loader``): pad to square, bilinear resize,
    [-1, 1] — nothing is cropped away."""
    if not isinstance(img, Image.Image):
        img = load_image(img)
    return to_tensor(pad_to_square(img).resize((size, size), Image.BILINEAR))
