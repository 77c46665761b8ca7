"""``unitok train-tokenizer --config configs/tokenizer/<name>.yaml [key=value ...] [--resume [latest|PATH]]``.

Multi-GPU: ``accelerate launch --multi_gpu --num_processes 8 -m unitok_cli train-tokenizer --config ...``
(CPU DDP: add ``ACCELERATE_USE_CPU=1``, see notes/env_feasibility.md §4).
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tokenizer/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.steps=100 data.paths=[imgs/] (values are YAML)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|auto|PATH",
                        help="continue from a checkpoint: 'latest' (default when given without a value) or 'auto' "
                             "(latest if any, else start fresh) under train.output_dir/checkpoints, or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _setup_logging() -> None:
    # Only the main process talks; the others log warnings and errors.
    import os

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s" if rank else
                        "%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rank:  # every rank reads its own records: its skipped ones are worth a line
        logging.getLogger("train.tokenizer.data").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    import yaml

    from train.common.config import to_dict

    from .config import TokenizerTrainConfig

    cfg = TokenizerTrainConfig.load(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _setup_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .trainer import train

    with logging_redirect_tqdm():
        train(cfg, resume=args.resume)
    return 0
