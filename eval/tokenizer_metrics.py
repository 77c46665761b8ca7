"""``unitok eval tokenizer``: a tokenizer's reconstruction, codebook and zero-shot figures, by the protocols the
papers use (``notes/eval_spec.md`` §10).

    unitok eval tokenizer --tokenizer PATH --data imagenet_reference_batch/ \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --lpips-weights lpips_with_vgg.pth
    unitok eval tokenizer --tokenizer PATH --data imagenet/val --zero-shot imagenet_zeroshot.json

* **PSNR / SSIM**, LlamaGen's ``reconstruction_vq_ddp.py`` protocol: gt = the image in [0, 1] (float32), the
  reconstruction ``clamp(127.5 y + 128, 0, 255)`` truncated to uint8, / 255; PSNR = skimage's
  ``peak_signal_noise_ratio(restored, gt)`` (data range 1, MSE accumulated in float64), SSIM = skimage's
  ``structural_similarity(restored, gt, data_range=2.0, channel_axis=-1)`` (its quirk: data range 2 on [0, 1]
  images; 7x7 uniform window, sample covariance, mean over channels). Both are re-implemented with numpy/scipy
  exactly as skimage computes them (tested against skimage where it is importable); the figure is the plain mean
  over images.
* **rFID**, UniTok's ``utils/eval_fid.py``: reconstructions as ``round((y + 1) 127.5)`` uint8, originals as read;
  InceptionV3 2048-d features as torch-fidelity's ``inception-v3-compat`` (``eval/inception.py``, weights from a
  local file); FID = ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2))`` with float64 ``np.cov``, as
  torch-fidelity 0.4.0 computes it.
* **LPIPS** (VGG, the lpips package formula) between the image and its reconstruction, mean over images.
* **Codebook usage and perplexity** per sub-codebook over every code position of the data.
* **Zero-shot top-1 / top-5**, open_clip's protocol (UniTok ``utils/eval_acc.py``): class column = normalise(mean
  over templates of normalise(text embedding)); image embedding of the *quantised* tokens (``encode_image``,
  normalised) on open_clip's eval transform (bicubic resize of the shorter side, centre crop, mean = std = 0.5);
  logits = 100 x cosine. Classes are ``--data``'s sub-folders in sorted order (ImageNet's wnid order), names and
  templates come from ``--zero-shot FILE`` (``{"classnames": [...], "templates": ["a photo of a {}.", ...]}``).

Images are brought to the tokenizer's side by ADM's ``center_crop_arr`` (box-halving, bicubic, centre crop; the
identity on the 256 px reference batch) for the reconstruction figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import uniform_filter

__all__ = ["psnr", "ssim", "llamagen_pair", "fid_from_features", "codebook_usage", "center_crop_arr",
           "clip_eval_transform", "zero_shot_classifier", "topk_hits", "list_images", "evaluate_reconstruction",
           "evaluate_zero_shot"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPEG", ".PNG", ".JPG")


# ---------------------------------------------------------------------------- PSNR / SSIM (skimage's arithmetic)
def psnr(restored: np.ndarray, gt: np.ndarray) -> float:
    """skimage ``peak_signal_noise_ratio(restored, gt)`` on float32 images in [0, 1] (data range 1)."""
    a, b = np.asarray(restored, np.float32), np.asarray(gt, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images of different shapes {a.shape} and {b.shape}")
    err = np.mean((a - b) ** 2, dtype=np.float64)
    return float(10 * np.log10(1.0 / err))


def ssim(restored: np.ndarray, gt: np.ndarray, data_range: float = 2.0, win_size: int = 7) -> float:
    """skimage ``structural_similarity(restored, gt, data_range=2.0, channel_axis=-1)`` on ``[H, W, C]`` float32:
    per channel, uniform 7x7 window (scipy's ``uniform_filter``, reflect mode), sample covariance, the SSIM map
    without the window's border, mean; then the mean over channels (float32, as skimage returns it)."""
    a, b = np.asarray(restored, np.float32), np.asarray(gt, np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"SSIM needs two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    pad = (win_size - 1) // 2
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = np.empty(a.shape[-1], dtype=np.float32)
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        ux, uy = uniform_filter(x, size=win_size), uniform_filter(y, size=win_size)
        uxx, uyy = uniform_filter(x * x, size=win_size), uniform_filter(y * y, size=win_size)
        uxy = uniform_filter(x * y, size=win_size)
        vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
        a1, a2, b1, b2 = 2 * ux * uy + c1, 2 * vxy + c2, ux ** 2 + uy ** 2 + c1, vx + vy + c2
        s = (a1 * a2) / (b1 * b2)
        per_channel[ch] = s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean(dtype=np.float64)
    return float(per_channel.mean())


def llamagen_pair(image: torch.Tensor, reconstruction: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[3, H, W]`` in [-1, 1] each -> (restored, gt) ``[H, W, 3]`` float32 in [0, 1], LlamaGen's way: the
    reconstruction truncated to uint8 from ``127.5 y + 128``, the original ``(x + 1) / 2``."""
    restored = torch.clamp(127.5 * reconstruction.float() + 128.0, 0, 255).permute(1, 2, 0).to(torch.uint8)
    gt = ((image.float() + 1) / 2).permute(1, 2, 0)
    return restored.numpy().astype(np.float32) / 255.0, gt.numpy().astype(np.float32)


# ---------------------------------------------------------------------------- FID
def fid_from_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """torch-fidelity 0.4.0 ``fid_features_to_statistics`` + ``fid_statistics_to_metric``."""
    f1, f2 = np.asarray(features_1, np.float32), np.asarray(features_2, np.float32)
    if f1.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID needs two [N >= 2, D] feature sets of one width, got {f1.shape} and {f2.shape}")
    mu1, mu2 = np.mean(f1, axis=0), np.mean(f2, axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s1.dot(s2)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def to_uint8_rounded(x: torch.Tensor) -> torch.Tensor:
    """UniTok's ``eval_fid.py`` PNG: ``round((x + 1) 127.5)``, clamped, uint8."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- codebooks
def codebook_usage(counts: np.ndarray) -> list[dict[str, float]]:
    """``counts[k, v]``: how often entry v of sub-codebook k was used -> per sub-codebook the share of entries used
    and the perplexity ``exp(-sum p log p)`` (= the codebook size when use is uniform)."""
    out = []
    for row in np.asarray(counts, np.float64):
        p = row / row.sum()
        nz = p[p > 0]
        out.append({"usage": float((row > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                    "used": int((row > 0).sum())})
    return out


# ---------------------------------------------------------------------------- images
def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{root}: no .png / .jpg / .jpeg images")
    return paths


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM / LlamaGen ``center_crop_arr``: halve with a box filter while the shorter side is >= 2 x size, bicubic to
    the shorter side = size, centre crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def clip_eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """open_clip ``image_transform(size, is_train=False, mean=std=0.5)``: torchvision ``Resize(size, bicubic)`` of
    the shorter side (long side ``int(size * long / short)``), ``CenterCrop(size)`` (offsets rounded), to [-1, 1]."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    from tokenizer.image import to_tensor

    return to_tensor(image)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def zero_shot_classifier(unitok, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[D, C]``: per class the normalised mean of the normalised text embeddings of its templates."""
    device = next(unitok.parameters()).device
    columns = []
    for name in classnames:
        texts = [t.format(name) if "{}" in t else t.format(c=name) for t in templates]
        emb = unitok.encode_text(unitok.tokenize_text(texts).to(device), normalize=True).mean(dim=0)
        columns.append(emb / emb.norm())
    return torch.stack(columns, dim=1)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """open_clip ``accuracy()``: how many labels are among the k highest logits, per k."""
    pred = logits.topk(max(ks), 1, True, True)[1].t()
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    return [int(correct[:k].reshape(-1).float().sum()) for k in ks]


# ---------------------------------------------------------------------------- runs
@torch.no_grad()
def evaluate_reconstruction(unitok, paths: Sequence[Path], batch_size: int = 32, inception=None, lpips=None,
                            progress: bool = False) -> dict:
    from tqdm import tqdm

    from tokenizer.image import load_image, to_tensor

    c = unitok.config
    device = next(unitok.parameters()).device
    counts = np.zeros((c.num_codebooks, c.codebook_size), np.int64)
    psnrs, ssims, lpips_values, feats_real, feats_rec, unreadable = [], [], [], [], [], []
    for batch in tqdm(list(_batches(paths, batch_size)), desc="tokenizer metrics", unit="batch",
                      disable=not progress):
        images = []
        for p in batch:
            try:
                images.append(to_tensor(center_crop_arr(load_image(p), c.image_size)))
            except (ValueError, FileNotFoundError) as err:
                unreadable.append(str(err))
        if not images:
            continue
        x = torch.stack(images).to(device)
        codes = unitok.encode(x)
        rec = unitok.decode(codes).float().cpu()
        for k in range(c.num_codebooks):
            counts[k] += np.bincount(codes[:, k].flatten().cpu().numpy(), minlength=c.codebook_size)
        x = x.float().cpu()
        for img, r in zip(x, rec):
            restored, gt = llamagen_pair(img, r)
            psnrs.append(psnr(restored, gt))
            ssims.append(ssim(restored, gt))
        if lpips is not None:
            lpips_values += lpips(x, rec.clamp(-1, 1)).flatten().tolist()
        if inception is not None:
            feats_real.append(inception(to_uint8_rounded(x)).numpy())
            feats_rec.append(inception(to_uint8_rounded(rec)).numpy())
    n = len(psnrs)
    if not n:
        raise ValueError(f"no readable image among {len(paths)}: {unreadable[0] if unreadable else ''}")
    out = {"n_images": n, "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
           "codebooks": codebook_usage(counts), "unreadable": unreadable}
    out["usage"] = float(np.mean([b["usage"] for b in out["codebooks"]]))
    out["perplexity"] = float(np.mean([b["perplexity"] for b in out["codebooks"]]))
    if lpips is not None:
        out["lpips"] = float(np.mean(lpips_values))
    if inception is not None:
        out["rfid"] = fid_from_features(np.concatenate(feats_real), np.concatenate(feats_rec))
    return out


@torch.no_grad()
def evaluate_zero_shot(unitok, root: Path, classnames: Sequence[str], templates: Sequence[str],
                       batch_size: int = 32, limit: int | None = None, progress: bool = False) -> dict:
    from tqdm import tqdm

    from tokenizer.image import load_image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) != len(classnames):
        raise ValueError(f"{root}: {len(classes)} class folders, but the zero-shot file names {len(classnames)} "
                         f"classes (folders in sorted order are the class indices)")
    items = [(p, i) for i, d in enumerate(classes) for p in list_images(root / d)]
    items = items[:limit] if limit else items
    weights = zero_shot_classifier(unitok, classnames, templates)
    device = weights.device
    hits, n, unreadable = [0, 0], 0, []
    for batch in tqdm(list(_batches(items, batch_size)), desc="zero-shot", unit="batch", disable=not progress):
        images, labels = [], []
        for p, label in batch:
            try:
                images.append(clip_eval_transform(load_image(p), unitok.config.image_size))
                labels.append(label)
            except (ValueError, FileNotFoundError) as err:
                unreadable.append(str(err))
        if not images:
            continue
        feats = unitok.encode_image(torch.stack(images).to(device), normalize=True)
        logits = 100.0 * feats @ weights
        for j, h in enumerate(topk_hits(logits, torch.tensor(labels, device=device), (1, min(5, len(classes))))):
            hits[j] += h
        n += len(labels)
    return {"top1": 100 * hits[0] / n, "top5": 100 * hits[1] / n, "n_images": n, "n_classes": len(classes),
            "unreadable": unreadable}


# ---------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="UniTok tokenizer (folder or official .pth)")
    p.add_argument("--data", required=True,
                   help="folder of images (searched recursively); for --zero-shot, one sub-folder per class")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: adds rFID")
    p.add_argument("--lpips-weights", nargs="+", default=None,
                   help="lpips_with_vgg.pth, or torchvision's vgg16 file + lpips' vgg.pth heads: adds LPIPS")
    p.add_argument("--zero-shot", default=None,
                   help='JSON {"classnames": [...], "templates": [...]}: zero-shot top-1/top-5 instead of the '
                        "reconstruction figures")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--device", default=None)


def _zero_shot_file(path: str) -> tuple[list[str], list[str]]:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no zero-shot file at {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg})") from None
    if not isinstance(spec, dict) or not spec.get("classnames") or not spec.get("templates"):
        raise ValueError(f'{path}: expected {{"classnames": [...], "templates": ["a photo of a {{}}.", ...]}}')
    return list(spec["classnames"]), list(spec["templates"])


def run(args: argparse.Namespace) -> int:
    from tokenizer import UniTok

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unitok = UniTok.from_pretrained(args.tokenizer).to(device).eval()
    if args.zero_shot:
        classnames, templates = _zero_shot_file(args.zero_shot)
        out = evaluate_zero_shot(unitok, Path(args.data), classnames, templates, args.batch_size, args.limit, True)
        lines = [f"zero-shot top-1 {out['top1']:.2f} %   top-5 {out['top5']:.2f} %   ({out['n_images']} images, "
                 f"{out['n_classes']} classes, {len(templates)} templates)"]
    else:
        inception = lpips = None
        if args.inception_weights:
            from metrics.inception import InceptionV3Features

            inception = InceptionV3Features.from_file(args.inception_weights).to(device)
        if args.lpips_weights:
            from metrics.lpips import LPIPS

            lpips = LPIPS.from_pretrained(args.lpips_weights, sqrt_eps=0.0).to(device)
        paths = list_images(args.data)[:args.limit]
        out = evaluate_reconstruction(unitok, paths, args.batch_size, inception, lpips, progress=True)
        lines = [f"PSNR {out['psnr']:.2f} dB   SSIM {out['ssim']:.4f}"
                 + (f"   LPIPS {out['lpips']:.4f}" if "lpips" in out else "")
                 + (f"   rFID {out['rfid']:.3f}" if "rfid" in out else "") + f"   ({out['n_images']} images)",
                 f"codebook usage {100 * out['usage']:.1f} %   perplexity {out['perplexity']:.1f} "
                 f"(of {unitok.config.codebook_size}; mean over {unitok.config.num_codebooks} sub-codebooks)"]
        lines += [f"    sub-codebook {k}: {b['used']} used ({100 * b['usage']:.1f} %), perplexity "
                  f"{b['perplexity']:.1f}" for k, b in enumerate(out["codebooks"])]
    for line in out["unreadable"]:
        print(f"skipped: {line}", file=sys.stderr)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0
