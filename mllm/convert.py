"""Reading foreign checkpoints: the released UniTok-MLLM layout (``unitok convert-mllm``) and plain Llama models.

Released layout (spec §f) -> ours:

    model.layers.* / model.embed_tokens / model.norm / lm_head   -> unchanged (the Llama backbone)
    model.multi_embedder.{quantizer,attn_projection,mm_projector}.*  -> code_embedder.*
    ar_head.*                                                     -> depth_head.*

The released ``config.json`` carries only the Llama fields; the image side is hard-coded in the reference, so its
sizes are options whose defaults are the released values. Tensors are renamed and checked against the shapes our
model expects, then written with safetensors (sharded for large models) — no model is instantiated, so converting
the 7B release needs memory for its tensors only.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from tokenizer.checkpoint import atomic_write_dir

from .configuration import UniTokMLLMConfig
from .modeling import UniTokMLLM
from .weights import llama_fields, read_state_dict

RENAMES = (("model.multi_embedder.", "code_embedder."), ("ar_head.", "depth_head."))
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
# image-side fields of the released model (not in its config.json)
RELEASED_IMAGE_SIDE = dict(num_codebooks=8, codebook_size=4096, code_dim=8, projection_dim=1024, projection_heads=16,
                           depth_layers=3, image_positions=256, chat_template="vicuna_v1")


def rename_released_key(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def released_key(key: str) -> str:
    """The inverse of :func:`rename_released_key`: our key -> the released checkpoint's name for it."""
    for old, new in RENAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def expected_shapes(config: UniTokMLLMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UniTokMLLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_released(src: str | Path, dst: str | Path, config_path: str | Path | None = None,
                     **image_side) -> Path:
    """Convert a released-layout checkpoint into our ``save_pretrained`` folder (atomic)."""
    src = Path(src)
    config_path = Path(config_path) if config_path else (src / "config.json" if src.is_dir() else None)
    if config_path is None or not config_path.is_file():
        raise FileNotFoundError(f"no Llama config.json for {src}; pass --config")
    config = UniTokMLLMConfig(**{**llama_fields(config_path), **RELEASED_IMAGE_SIDE, **image_side})
    state = {rename_released_key(k): v for k, v in read_state_dict(src).items()}
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError("checkpoint does not match the released layout with these image-side sizes "
                         f"(K={config.num_codebooks}, {config.codebook_size} codes, code_dim {config.code_dim}, "
                         f"projection {config.projection_dim}/{config.projection_heads} heads, "
                         f"{config.depth_layers} head layers): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shapes {wrong[:5]}")
    return write_checkpoint(dst, config, state, tokenizer_from=src if src.is_dir() else None)


def write_checkpoint(dst: str | Path, config: UniTokMLLMConfig, state: dict[str, torch.Tensor],
                     tokenizer_from: Path | None = None) -> Path:
    from huggingface_hub import save_torch_state_dict

    def write(tmp: Path) -> None:
        config.architectures = ["UniTokMLLM"]
        config.save_pretrained(tmp)
        save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size="5GB")
        for name in TOKENIZER_FILES:
            if tokenizer_from is not None and (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, tmp / name)

    return atomic_write_dir(dst, write)


# ---------------------------------------------------------------------------- CLI: unitok convert-mllm
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="released checkpoint: a folder (config.json + safetensors/.bin, sharded or not) or a file")
    p.add_argument("dst", help="output folder (our save_pretrained format)")
    p.add_argument("--config", default=None, help="Llama config.json when SRC is a single file")
    for name, default in RELEASED_IMAGE_SIDE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=f"(released: {default})")


def run(args: argparse.Namespace) -> int:
    sizes = {k: getattr(args, k) for k in RELEASED_IMAGE_SIDE}
    out = convert_released(args.src, args.dst, args.config, **sizes)
    print(f"converted {args.src} -> {out}")
    return 0
