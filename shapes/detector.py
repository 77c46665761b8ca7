"""Exact object recovery for the shapes world: colour segmentation + shape templates (no learned detector).

1. Every pixel gets the nearest palette colour (RGB distance) if that distance is below ``color_threshold``;
   everything else (background, blends at blurred edges) is background.
2. Connected components (8-connectivity) per colour; components smaller than ``min_area`` (scaled with the image
   area, 64x64 reference) are ignored.
3. Shape = the template (``world.shape_mask`` resampled to the component's bounding box) with the highest IoU with the
   component's mask; the IoU is the detection's ``score``. Components whose best IoU is below ``min_iou``, or whose
   box is far from square, are not objects.
4. Blurry or imperfect blobs (reconstructions through a lossy tokenizer) are matched on the soft map instead: the
   per-pixel share of the object colour, against every shape blurred at several levels, the candidate with the
   least squared error winning (:func:`_soft_match`).

On ground-truth renders every object is recovered with IoU 1.0 (same mask function, same box). Under Gaussian blur
up to sigma 1.2 px plus pixel noise (sigma 8) every shape and colour is still recovered (tested), with boxes within
a pixel. Vectorised with numpy/scipy: ~2 ms per clean 64x64 image, ~8 ms per blurred one.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from .world import COLOR_NAMES, COLORS, SHAPES, shape_mask

__all__ = ["Detection", "DetectorConfig", "DEFAULT_DETECTOR", "to_array", "estimate_background", "alpha_maps",
           "classify_pixels", "detect"]

_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], np.int32)  # (K, 3)
_PALETTE_F = _PALETTE.astype(np.float64)
_EIGHT = np.ones((3, 3), bool)
_DEFAULT_BG = (230, 230, 230)


@dataclass(frozen=True)
class DetectorConfig:
    alpha_threshold: float = 0.5    # min share of the object colour in a pixel (blend with the background)
    residual_threshold: float = 60.0  # max RGB distance of a pixel from the background-to-colour line
    min_area: float = 12.0          # px at 64x64; scaled by (H*W)/(64*64)
    min_iou: float = 0.6            # best template IoU needed to call a blob an object
    max_aspect: float = 2.0         # box side ratio above which a blob is not an object
    work_size: int | None = 64      # larger images are box-downsampled to about this size first (boxes mapped back)
    rim: float = 3.0                # px (at 64x64) around a blob whose blended pixels belong to it
    soft_match: bool = True         # blur-aware template matching when the exact binary match is imperfect


DEFAULT_DETECTOR = DetectorConfig()


@dataclass(frozen=True)
class Detection:
    shape: str                                  # GenEval "class"
    color: str
    bbox: tuple[float, float, float, float]     # (x1, y1, x2, y2), exclusive end, pixels
    centroid: tuple[float, float]               # (x, y) of the mask's pixel centres
    area: int                                   # pixels
    score: float                                # IoU with the best template (1.0 on ground-truth renders)

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.shape, "color": self.color, "bbox": list(self.bbox),
                "centroid": list(self.centroid), "area": self.area, "score": self.score}


def to_array(image: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a PIL image, a path, or an array (uint8, or float in [0, 1])."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.size and a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        arr = np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)
    return arr


def estimate_background(arr: np.ndarray, far: float = 110.0) -> np.ndarray:
    """Per-pixel background colour ``(H, W, 3)`` float: a least-squares plane per channel (flat tones and linear
    gradients exactly) through the pixels far from every palette colour, refitted once without outliers."""
    h, w, _ = arr.shape
    a = arr.astype(np.float64)
    flat = a.reshape(-1, 3)
    d2 = ((flat * flat).sum(1)[:, None] - 2 * flat @ _PALETTE_F.T + (_PALETTE_F ** 2).sum(1)[None, :]).min(1)
    cand = (d2 > far ** 2).reshape(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), (xx.ravel() + 0.5) / w - 0.5, (yy.ravel() + 0.5) / h - 0.5], 1)
    sel = cand.ravel()
    if sel.sum() < max(16, 0.05 * h * w):
        return np.broadcast_to(np.asarray(_DEFAULT_BG, np.float64), (h, w, 3)).copy()
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[sel], flat[sel], rcond=None)
        fit = design @ coef
        res = np.sqrt(((flat - fit) ** 2).sum(-1))
        new_sel = sel & (res < 20.0)
        if new_sel.sum() < max(16, 0.05 * h * w) or (new_sel == sel).all():
            break
        sel = new_sel
    return fit.reshape(h, w, 3)


def alpha_maps(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel and palette colour k, the pixel as a blend ``alpha * colour_k + (1 - alpha) * background``:
    returns ``alpha`` and the distance of the pixel from that blend line (``residual``), both ``(H, W, K)``."""
    arr = to_array(image).astype(np.float64)
    h, w, _ = arr.shape
    bg = estimate_background(arr).reshape(-1, 3)
    u = arr.reshape(-1, 3) - bg                                              # (N, 3)
    uv = u @ _PALETTE_F.T - (u * bg).sum(1)[:, None]                         # u . (c_k - bg)
    vv = (_PALETTE_F ** 2).sum(1)[None, :] - 2 * bg @ _PALETTE_F.T + (bg * bg).sum(1)[:, None]
    vv = np.maximum(vv, 1e-6)
    alpha = uv / vv
    residual = np.sqrt(np.maximum((u * u).sum(1)[:, None] - alpha * uv, 0.0))
    alpha = alpha.reshape(h, w, -1)
    residual = residual.reshape(h, w, -1)
    return alpha, residual


def classify_pixels(image: Any, config: "DetectorConfig | None" = None) -> np.ndarray:
    """``(H, W)`` int array: index into ``COLOR_NAMES`` of each pixel's colour, -1 for background.

    A pixel belongs to colour k when it is at least half colour k (``alpha >= 0.5``, the half-way level set keeps
    straight edges in place under blur) and lies close to the background-to-colour-k line; among such colours the
    closest line wins."""
    cfg = config or DEFAULT_DETECTOR
    alpha, residual = alpha_maps(image)
    ok = (alpha >= cfg.alpha_threshold) & (alpha <= 1.75) & (residual < cfg.residual_threshold)
    r = np.where(ok, residual, np.inf)
    k = r.argmin(-1)
    return np.where(np.isfinite(np.take_along_axis(r, k[..., None], -1)[..., 0]), k, -1)


@lru_cache(maxsize=4096)
def _templates(h: int, w: int) -> np.ndarray:
    t = np.stack([shape_mask(s, h, w) for s in SHAPES])  # (S, h, w)
    t.setflags(write=False)
    return t


def _best_shape(mask: np.ndarray) -> tuple[int, float]:
    t = _templates(*mask.shape)
    inter = (t & mask).sum(axis=(1, 2))
    union = (t | mask).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    k = int(iou.argmax())
    return k, float(iou[k])


_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.4)  # blur levels tried by the soft matcher, in px at 64x64


@lru_cache(maxsize=8192)
def _blurred(shape: str, side: int, sigma: float, pad: int) -> np.ndarray:
    m = np.pad(shape_mask(shape, side).astype(np.float64), pad)
    if sigma > 0:
        m = ndimage.gaussian_filter(m, sigma, mode="constant", truncate=3.0)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=8192)
def _fill_and_offset(shape: str, side: int) -> tuple[float, float]:
    m = shape_mask(shape, side)
    yy = np.nonzero(m)[0]
    if yy.size == 0:  # too small to draw this shape at all (e.g. a 2-px cross)
        return 0.0, 0.0
    return float(m.mean()), float(yy.mean() + 0.5 - side / 2)


def _soft_match(a: np.ndarray, valid: np.ndarray, scale: float) -> tuple[int, float, tuple[float, float, float, float]]:
    """Best (shape, soft IoU, box in window coordinates) for the soft map ``a`` (object share per pixel, in [0, 1]).

    Candidates: every shape, at sides around the one implied by the mass and that shape's fill ratio, placed at the
    mass centroid (that shape's own centroid offset), blurred by each of ``_SIGMAS``. The mass and centroid come from
    the pixels with ``a >= 0.1`` (robust to background noise). The winner is the candidate with the least squared
    error against ``a`` over the ``valid`` pixels (this object and plain background; pixels of other objects are left
    out): under blur + pixel noise this is the maximum-likelihood template, whereas the soft IoU of a truncated map
    favours compact shapes (a blurred small diamond looks like a smaller circle to IoU). The score is the soft IoU of
    that candidate against the truncated map, 1.0 for an exact blur-free match."""
    a = np.where(valid, np.clip(a, 0.0, 1.0), 0.0)
    a_thr = np.where(a >= 0.1, a, 0.0)
    mass = float(a_thr.sum())
    if mass <= 0:
        return 0, 0.0, (0.0, 0.0, 0.0, 0.0)
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx = float((a_thr * (xx + 0.5)).sum() / mass)
    cy = float((a_thr * (yy + 0.5)).sum() / mass)
    sigmas = tuple(sorted({round(s * scale, 2) for s in _SIGMAS}))
    pad = int(np.ceil(3 * max(sigmas))) + 1
    vf = valid.astype(np.float64)
    total_sq = float((a * a).sum())
    best_sse, best = np.inf, (0, 0.0, (0.0, 0.0, 0.0, 0.0))
    for k, shape in enumerate(SHAPES):
        fill, _ = _fill_and_offset(shape, max(2, int(round(np.sqrt(mass)))))
        if fill <= 0:
            continue
        s_est = np.sqrt(mass / max(fill, 1e-6))
        sides = range(max(2, int(np.floor(s_est)) - 2), int(np.ceil(s_est)) + 2)
        for side in sides:
            side_fill, off = _fill_and_offset(shape, side)
            if side_fill <= 0:
                continue
            fx, fy = cx - side / 2, cy - off - side / 2
            for x0 in {int(np.floor(fx)), int(np.ceil(fx))}:
                for y0 in {int(np.floor(fy)), int(np.ceil(fy))}:
                    ty0, tx0 = y0 - pad, x0 - pad
                    n = side + 2 * pad
                    ys0, xs0, ys1, xs1 = max(ty0, 0), max(tx0, 0), min(ty0 + n, h), min(tx0 + n, w)
                    if ys1 <= ys0 or xs1 <= xs0:
                        continue
                    sub, vsub = a[ys0:ys1, xs0:xs1], vf[ys0:ys1, xs0:xs1]
                    t = np.stack([_blurred(shape, side, sg, pad) for sg in sigmas])[
                        :, ys0 - ty0:ys1 - ty0, xs0 - tx0:xs1 - tx0] * vsub
                    # sum over valid pixels of (t - a)^2, with t = 0 outside the template window
                    sse = total_sq + (t * t - 2 * t * sub).sum(axis=(1, 2))
                    j = int(sse.argmin())
                    if sse[j] < best_sse - 1e-9:
                        tj, sub_thr = t[j], a_thr[ys0:ys1, xs0:xs1]
                        inter = float(np.minimum(tj, sub_thr).sum())
                        union = float(np.maximum(tj, sub_thr).sum()) + (mass - float(sub_thr.sum()))
                        best_sse = float(sse[j])
                        best = (k, inter / max(union, 1e-9), (float(x0), float(y0), float(x0 + side), float(y0 + side)))
    return best


def detect(image: Any, config: DetectorConfig = DEFAULT_DETECTOR) -> list[Detection]:
    """All objects in ``image``, in reading order of their boxes (top-left first). Boxes, centroids and areas are in
    the input image's pixels."""
    cfg = config
    arr = to_array(image)
    in_h, in_w = arr.shape[:2]
    if cfg.work_size and min(in_h, in_w) > 1.5 * cfg.work_size:
        f = min(in_h, in_w) / cfg.work_size
        size = (max(1, int(round(in_w / f))), max(1, int(round(in_h / f))))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.BOX), dtype=np.uint8)
    h, w = arr.shape[:2]
    sx, sy = in_w / w, in_h / h  # working pixels -> input pixels

    alpha, residual = alpha_maps(arr)
    ok = (alpha >= cfg.alpha_threshold) & (alpha <= 1.75) & (residual < cfg.residual_threshold)
    r = np.where(ok, residual, np.inf)
    kmin = r.argmin(-1)
    labels = np.where(np.isfinite(np.take_along_axis(r, kmin[..., None], -1)[..., 0]), kmin, -1)
    scale = np.sqrt(h * w / (64 * 64))
    min_area = cfg.min_area * scale ** 2
    margin = int(np.ceil(3 * max(_SIGMAS) * scale)) + 2

    # connected components of every colour, with one global id each (0 = background)
    gid = np.zeros((h, w), np.int32)
    comps: list[tuple[int, int, tuple[slice, slice], int]] = []  # (global id, colour, slice, area)
    for ci in np.unique(labels):
        if ci < 0:
            continue
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        base = len(comps)
        gid = np.where(comp > 0, comp + base, gid)
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            comps.append((base + idx, int(ci), sl, int(areas[idx])))
    if not comps:
        return []
    owner = None
    if cfg.soft_match:
        # each unlabelled pixel belongs to the rim of its nearest component (no bleed between neighbours)
        dist, (iy, ix) = ndimage.distance_transform_edt(gid == 0, return_indices=True)
        owner = np.where(dist <= cfg.rim * scale, gid[iy, ix], 0)

    out: list[Detection] = []
    for g, ci, sl, area in comps:
        if area < min_area:
            continue
        ys, xs = sl
        bh, bw = ys.stop - ys.start, xs.stop - xs.start
        if max(bh, bw) > cfg.max_aspect * min(bh, bw):
            continue
        mask = gid[sl] == g
        k, iou = _best_shape(mask)
        box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
        if owner is not None:
            y0, x0 = max(ys.start - margin, 0), max(xs.start - margin, 0)
            win = (slice(y0, min(ys.stop + margin, h)), slice(x0, min(xs.stop + margin, w)))
            a = np.clip(alpha[win + (ci,)], 0.0, 1.0)
            near = (gid[win] == 0) & (residual[win + (ci,)] < cfg.residual_threshold)
            mine = (gid[win] == g) | (near & (owner[win] == g))
            # valid: this object and its rim, plus plain background (owned by no blob) as zero-evidence pixels
            valid = mine | (near & (owner[win] == 0))
            blurry = ((a > 0.15) & (a < 0.85) & mine).sum() > 0.05 * mask.sum()
            if iou < 1.0 or blurry:  # not a crisp exact shape: blur-aware templates on the soft map
                k, iou, b = _soft_match(np.where(mine, a, 0.0), valid, scale)
                box = (b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0)
        if iou < cfg.min_iou:
            continue
        yy, xx = np.nonzero(mask)
        out.append(Detection(
            shape=SHAPES[k], color=COLOR_NAMES[ci],
            bbox=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy),
            centroid=(float(xx.mean() + xs.start + 0.5) * sx, float(yy.mean() + ys.start + 0.5) * sy),
            area=int(round(area * sx * sy)), score=iou))
    out.sort(key=lambda d: (d.bbox[1], d.bbox[0]))
    return out
