"""``unitok serve``: the OpenAI-compatible server and web UI (``serve.api``) over one batching engine
(``serve.engine``). With no model arguments it serves the model ``unitok demo`` trained."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from .api import API_KEY_ENV, Limits

DEMO_MODEL, DEMO_TOKENIZER = Path("runs/demo/instruct/model"), Path("runs/demo/tokenizer/model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"MLLM folder (default: {DEMO_MODEL}, from `unitok demo`)")
    p.add_argument("--tokenizer", default=None, help=f"UniTok tokenizer (default: {DEMO_TOKENIZER})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you say otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY on /v1 (or ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-rows", type=int, default=16, help="rows in the running batch (a guided image: 2)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    for f in dataclasses.fields(Limits):  # one flag per request limit, named, typed and defaulted by the field
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")
    p.add_argument("--allowed-origins", nargs="*", default=None, help="CORS origins (off unless given)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build_server(args: argparse.Namespace):
    from mllm.cli import load_mllm, load_unitok

    from .api import Server
    from .engine import Engine

    model_dir = Path(args.model) if args.model else DEMO_MODEL
    tokenizer = Path(args.tokenizer) if args.tokenizer else DEMO_TOKENIZER
    if args.model is None and not model_dir.is_dir():
        raise FileNotFoundError(f"no model at {model_dir}: run `unitok demo` first, or pass --model and --tokenizer")
    for name, value in (("--max-batch-rows", args.max_batch_rows), ("--max-queue", args.max_queue),
                        ("--max-n", args.max_n), ("--max-images-per-request", args.max_images_per_request)):
        minimum = 2 if name == "--max-batch-rows" else 1  # a guided picture needs 2 rows
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    model, processor = load_mllm(str(model_dir), args.device, args.dtype)
    unitok = load_unitok(str(tokenizer), model, model.device)
    engine = Engine(model, processor, unitok, max_rows=args.max_batch_rows, max_queue=args.max_queue)
    name = args.served_model_name or model_dir.resolve().name
    if name == "model":  # save_pretrained folders are often .../<run>/model
        name = model_dir.resolve().parent.name
    return Server(engine, name, limits, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app

    server = build_server(args)
    app = create_app(server, args.allowed_origins)
    print(f"serving {server.model_name} on http://{args.host}:{args.port}  (web UI: /ui, API: /v1)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.engine.close()
    return 0
