"""What every ``unitok train*`` command shares: arguments (config, overrides, resume), logging, the run wrapper."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable


def add_train_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.steps=100 optim.lr=1e-4 (values are YAML)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|auto|PATH",
                        help="continue from a checkpoint: 'latest' (default when given without a value) or 'auto' "
                             "(latest if any, else start fresh) under train.output_dir/checkpoints, or a path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a train.output_dir that holds an earlier run, deleting its outputs")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def setup_logging(quiet_on_other_ranks: tuple[str, ...] = ()) -> None:
    """Only the main process talks; the others log warnings and errors (and their own data problems)."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s" if rank else
                        "%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rank:
        for name in quiet_on_other_ranks:
            logging.getLogger(name).setLevel(logging.WARNING)


def run_training(args: argparse.Namespace, load: Callable[[str, list[str]], Any],
                 train: Callable[..., Any], data_loggers: tuple[str, ...] = ()) -> Any:
    """Load + validate the config, ``--print-config`` or train with tqdm-friendly logging."""
    import yaml
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .config import to_dict

    cfg = load(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None
    setup_logging(data_loggers)
    with logging_redirect_tqdm():
        return cfg, train(cfg, resume=args.resume, overwrite=args.overwrite)
