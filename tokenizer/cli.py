"""``unitok encode`` / ``unitok decode``: images <-> code files.

A code file is a safetensors file with ``codes`` (int64 [B, K, N]) and metadata: the source image names and the
tokenizer's grid / codebook sizes, so ``decode`` can refuse codes made by a different tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import claim_output
from .image import make_grid, preprocess, to_pil
from .model import UniTok


def load_tokenizer(path: str, preset: str | None = None, causal_projection: bool = False) -> UniTok:
    return UniTok.from_pretrained(path, preset=preset, causal_projection=causal_projection or None)


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="folder written by save_pretrained, or an official .pth")
    p.add_argument("--preset", default=None, help="config preset for an official .pth whose args cannot be read")
    p.add_argument("--causal-projection", action="store_true",
                   help="the February-2025 checkpoint (causal attention projections)")
    p.add_argument("--batch-size", type=int, default=8)


def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_tokenizer_args(p)


def _encode(args: argparse.Namespace) -> int:
    claim_output(args.out, args.overwrite)
    tok = load_tokenizer(args.tokenizer, args.preset, args.causal_projection)
    size = tok.config.image_size
    # Read every image first: a corrupt one stops the run before anything is written.
    images = torch.stack([preprocess(p, size) for p in args.images])
    with torch.inference_mode():
        codes = torch.cat([tok.encode(b) for b in images.split(args.batch_size)])
    meta = {"images": json.dumps([str(p) for p in args.images]), "image_size": str(size),
            "num_codebooks": str(tok.config.num_codebooks), "codebook_size": str(tok.config.codebook_size),
            "num_positions": str(tok.config.num_positions)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file({"codes": codes.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"encoded {len(codes)} image(s) -> {out}  codes {tuple(codes.shape)} "
          f"(K={tok.config.num_codebooks} sub-codebooks x N={tok.config.num_positions} positions)")
    return 0


def read_codes(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no code file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "codes" not in f.keys():
                raise ValueError(f"{path} has no 'codes' tensor (found {list(f.keys())})")
            return f.get_tensor("codes"), dict(f.metadata() or {})
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ValueError(f"cannot read code file {path}: {err}") from err


def check_codes_file(path, codes: torch.Tensor, meta: dict[str, str], config) -> list[str]:
    """The codes of ``path`` (``[B, K, N]``) against the tokenizer about to decode them, and the image names
    ``encode`` stored; every mismatch names both values. Returns one name per image."""
    if codes.ndim != 3 or codes.dtype.is_floating_point:
        raise ValueError(f"{path}: codes must be integer [images, K, N], got {codes.dtype} {tuple(codes.shape)}")
    expected = {"num_codebooks": config.num_codebooks, "codebook_size": config.codebook_size,
                "num_positions": config.num_positions}
    for field, want in expected.items():  # what `encode` wrote: codes of another tokenizer must not decode silently
        if field in meta and int(meta[field]) != want:
            raise ValueError(f"{path}: codes were written with {field}={meta[field]}, the tokenizer has {want}")
    for axis, field in ((1, "num_codebooks"), (2, "num_positions")):
        if codes.shape[axis] != expected[field]:
            raise ValueError(f"{path}: codes have {codes.shape[axis]} along axis {axis} ({field}), the tokenizer "
                             f"has {expected[field]}")
    if "images" not in meta:
        return [f"{i:05d}" for i in range(len(codes))]
    try:
        names = json.loads(meta["images"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the 'images' metadata is not a JSON list ({err})") from err
    if not isinstance(names, list) or len(names) != len(codes):
        got = len(names) if isinstance(names, list) else type(names).__name__
        raise ValueError(f"{path}: {len(codes)} code images but {got} image names in its metadata")
    return [str(n) for n in names]


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("codes", help="a .safetensors file written by `unitok encode` (or holding 'codes' [B,K,N])")
    p.add_argument("--out", required=True, help="output folder for PNG files")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace the PNGs of an earlier decode in --out")
    _add_tokenizer_args(p)


DECODE_OUTPUTS = ("[0-9][0-9][0-9][0-9][0-9]_*.png", "grid.png")


def _decode(args: argparse.Namespace) -> int:
    codes, meta = read_codes(args.codes)
    claim_output(args.out, args.overwrite, DECODE_OUTPUTS)
    tok = load_tokenizer(args.tokenizer, args.preset, args.causal_projection)
    if codes.ndim == 2:
        codes = codes[None]
    names = check_codes_file(args.codes, codes, meta, tok.config)
    with torch.inference_mode():
        images = torch.cat([tok.decode(b) for b in codes.split(args.batch_size)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (img, name) in enumerate(zip(images, names)):
        path = out / f"{i:05d}_{Path(name).stem}.png"
        to_pil(img).save(path)
        written.append(path)
    if args.grid:
        make_grid(images).save(out / "grid.png")
    print(f"decoded {len(written)} image(s) -> {out}/")
    return 0


encode = SimpleNamespace(add_arguments=_encode_args, run=_encode)
decode = SimpleNamespace(add_arguments=_decode_args, run=_decode)
