"""The ``unitok`` command: one CLI, one sub-command per job.

Each sub-command lives next to the code it drives: ``"package.module"`` names a module exposing
``add_arguments(parser)`` and ``run(args) -> int | None``; ``"package.module:name"`` names an object in it with
those two attributes. The module is imported only when its command runs, so ``unitok --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo.pipeline", "the whole system in a toy world on a CPU: train, chat, draw, score (cached)"),
    "encode": ("tokenizer.cli:encode", "images -> UniTok codes (safetensors)"),
    "decode": ("tokenizer.cli:decode", "UniTok codes -> PNG images"),
    "train-tokenizer": ("train.tokenizer.cli", "train a UniTok tokenizer from a YAML config"),
    "extract-codes": ("train.data.extract", "precompute UniTok codes of a dataset (parquet shards, resumable)"),
    "chat": ("mllm.cli:chat_command", "multi-turn chat about images with a UniTok MLLM"),
    "generate": ("mllm.cli:generate_command", "text-to-image with a UniTok MLLM (PNGs + grid)"),
    "train": ("train.mllm.cli:train_command", "train the MLLM from a YAML recipe (pretraining, instruction tuning)"),
    "merge-lora": ("train.mllm.cli:merge_lora_command", "merge a LoRA adapter into its base model"),
    "serve": ("serve.cli", "OpenAI-compatible server + web UI for a UniTok MLLM (chat with images, text-to-image)"),
    "eval": ("eval.cli", "score a model: `unitok eval shapes --model DIR --tokenizer PATH`"),
    "convert-mllm": ("mllm.convert", "convert released UniTok-MLLM weights to this project's format"),
}

# The error policy: these are the user's to fix (a bad path, file or value; our code raises them with a message that
# names the file or field): one line, exit 2. Anything else (RuntimeError, CUDA OOM, NCCL, a bug) keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitok", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module_name, _, attr = module_name.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        module = getattr(module, attr)
    parser = argparse.ArgumentParser(prog=f"unitok {name}", description=help_text)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"unitok {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
