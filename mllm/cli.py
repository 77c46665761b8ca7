"""``unitok chat`` (multi-turn terminal session) and ``unitok generate`` (text-to-image PNGs + grid)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_mllm(path: str, device: str | None = None, dtype: str | None = None, max_length: int | None = None):
    """Model + processor (the text tokenizer is read from the model folder)."""
    from transformers import AutoTokenizer

    from .modeling import UniTokMLLM
    from .processing import MLLMProcessor

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    dev = _device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = UniTokMLLM.from_pretrained(path, dtype=torch_dtype).to(dev).eval()
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path} has no text tokenizer files ({err})") from None
    limit = max_length or model.config.max_position_embeddings
    return model, MLLMProcessor(text_tokenizer, model.config, max_length=limit)


def load_unitok(path: str, model, device: torch.device):
    from tokenizer import UniTok

    unitok = UniTok.from_pretrained(path).to(device).eval()
    c, mc = unitok.config, model.config
    if (c.num_codebooks, c.codebook_size, c.num_positions) != (mc.num_codebooks, mc.codebook_size,
                                                                mc.image_positions):
        raise ValueError(f"tokenizer {path} (K={c.num_codebooks}, {c.codebook_size} codes, {c.num_positions} "
                         f"positions) does not match the model (K={mc.num_codebooks}, {mc.codebook_size} codes, "
                         f"{mc.image_positions} positions)")
    return unitok


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MLLM folder (save_pretrained / convert-mllm output)")
    p.add_argument("--tokenizer", required=True, help="UniTok tokenizer (folder or official .pth)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


# ---------------------------------------------------------------------------- chat
def _chat_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", default=None, help="replace the template's system prompt")
    p.add_argument("--image-dir", default="chat-images",
                   help="where pictures the assistant draws are saved (PNG; ask e.g. 'Draw a red circle.')")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of pictures the assistant draws")
    p.add_argument("--seed", type=int, default=0, help="picture k of the session uses seed + k")


MAX_IMAGES_PER_PROMPT = 256  # one grid per prompt: more is a typo, not a request
CHAT_HELP = ("commands: /image PATH (attach to the next message), /reset, /quit; ask e.g. 'Draw a red circle.' "
             "for a picture (saved under --image-dir)")


def _chat(args: argparse.Namespace) -> int:
    from tokenizer.image import preprocess_padded
    from transformers import TextStreamer

    from tokenizer.image import to_pil

    from .conversation import IMAGE_PLACEHOLDER
    from .generation import ImageSampling, TextSampling, reply

    # settings first: a bad flag is refused before minutes of model loading
    sampling = TextSampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    drawing = ImageSampling(cfg_scale=args.cfg, temperature=1.0)
    model, processor = load_mllm(args.model, args.device, args.dtype)
    unitok = load_unitok(args.tokenizer, model, model.device)
    drawn = 0
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages, codes, pending = list(base), [], list(args.image)
    interactive = sys.stdin.isatty()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            print("user> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, codes, pending = list(base), [], []
            continue
        if line.startswith("/image"):
            pending.append(line.split(maxsplit=1)[1] if " " in line else "")
            continue
        try:  # a bad image or an over-long conversation ends this turn, not the session
            new_images = [preprocess_padded(p, unitok.config.image_size) for p in pending]
            if new_images:
                with torch.inference_mode():
                    codes.append(unitok.encode(torch.stack(new_images).to(model.device)))
            content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in pending) + line
            pending = []
            turn = messages + [{"role": "user", "content": content}]
            print("assistant> ", end="", flush=True)
            streamer = TextStreamer(processor.tokenizer, skip_special_tokens=True)
            answer = reply(model, processor, turn, torch.cat(codes) if codes else None, sampling, streamer=streamer,
                           image_sampling=drawing, seed=args.seed + drawn)
            if answer.image_codes is not None:
                with torch.inference_mode():
                    picture = to_pil(unitok.decode(answer.image_codes[None].to(model.device))[0].cpu())
                path = Path(args.image_dir) / f"image-{drawn:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path)
                drawn += 1
                codes.append(answer.image_codes[None])  # later turns see the picture, as the model drew it
                print(f"[image: {path}]")
        except (ValueError, FileNotFoundError, OSError) as err:
            pending = []
            print(f"\nerror: {err}", file=sys.stderr)
            continue
        messages = turn + [answer.message()]


# ---------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    _common(p)
    p.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batched rollout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the PNGs of an earlier run in --out")


GENERATE_OUTPUTS = ("[0-9][0-9][0-9][0-9][0-9].png", "grid.png")


def _generate(args: argparse.Namespace) -> int:
    from tokenizer.checkpoint import claim_output
    from tokenizer.image import make_grid, to_pil

    from .generation import ImageSampling, generate_images

    if not 1 <= args.num_images <= MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {args.num_images}")
    sampling = ImageSampling(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    out = Path(args.out)
    claim_output(out, args.overwrite, GENERATE_OUTPUTS)  # before loading: a wrong --out costs nothing
    model, processor = load_mllm(args.model, args.device, args.dtype)
    unitok = load_unitok(args.tokenizer, model, model.device)
    jobs = [(p, args.seed + i) for p in args.prompt for i in range(args.num_images)]
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        codes = generate_images(model, processor, [p for p, _ in batch], sampling, seeds=[s for _, s in batch])
        with torch.inference_mode():
            pixels = unitok.decode(codes.to(model.device))
        for j, img in enumerate(pixels):
            path = out / f"{start + j:05d}.png"
            to_pil(img).save(path)
            images.append(img.cpu())
    make_grid(torch.stack(images), ncols=args.num_images).save(out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png -> {out}/")
    return 0


chat_command = SimpleNamespace(add_arguments=_chat_args, run=_chat)
generate_command = SimpleNamespace(add_arguments=_generate_args, run=_generate)
