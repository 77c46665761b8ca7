"""``unitok train-tokenizer --config configs/tokenizer/<name>.yaml [key=value ...] [--resume [latest|PATH]]``.

Multi-GPU: ``accelerate launch --multi_gpu --num_processes 8 -m unitok_cli train-tokenizer --config ...``
(CPU DDP: add ``ACCELERATE_USE_CPU=1``, see notes/env_feasibility.md §4).
"""
from __future__ import annotations

import argparse

from train.common.cli import add_train_arguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, "configs/tokenizer/tiny.yaml")


def run(args: argparse.Namespace) -> int:
    from .config import TokenizerTrainConfig
    from .trainer import train

    run_training(args, TokenizerTrainConfig.load, train, data_loggers=("train.tokenizer.data",))
    return 0
