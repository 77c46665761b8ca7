"""``unitok train --config configs/recipes/<name>.yaml [key=value ...] [--resume [latest|auto|PATH]]`` and
``unitok merge-lora``.

Launch (see README): one process ``unitok train ...``; several GPUs/nodes
``accelerate launch [--num_machines M --machine_rank R --main_process_ip IP] --num_processes P -m unitok_cli train ...``
with ``train.deepspeed=configs/deepspeed/zero2.json`` (or zero3 / zero3_offload) in the recipe or on the command line.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from train.common.cli import add_train_arguments, run_training


def _train_args(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, "configs/recipes/demo-pretrain.yaml")


def _train(args: argparse.Namespace) -> int:
    from .config import MLLMTrainConfig
    from .trainer import train

    result = run_training(args, MLLMTrainConfig.load, train, data_loggers=("train.data.loader",))
    if result and result[1]:
        cfg, history = result
        print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f} -> {Path(cfg.train.output_dir) / 'final'}")
    return 0


def _merge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (train.output_dir/final/adapter or a checkpoint export)")
    parser.add_argument("--base", default=None, help="base model folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", required=True, help="output folder: a plain model in our save_pretrained format")


def _merge(args: argparse.Namespace) -> int:
    import json
    import shutil

    from peft import PeftModel

    from mllm import UniTokMLLM
    from tokenizer.checkpoint import atomic_write_dir

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json")
    base_path = args.base or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise FileNotFoundError(f"base model folder not found ({base_path!r}); pass --base")
    merged = PeftModel.from_pretrained(UniTokMLLM.from_pretrained(base_path), str(adapter)).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        for src in (adapter, Path(base_path)):
            for f in src.glob("tokenizer*"):
                shutil.copy2(f, tmp / f.name)
            if (src / "special_tokens_map.json").is_file():
                shutil.copy2(src / "special_tokens_map.json", tmp / "special_tokens_map.json")

    atomic_write_dir(args.out, write)
    print(f"merged {adapter} into {base_path} -> {args.out}")
    return 0


train_command = SimpleNamespace(add_arguments=_train_args, run=_train)
merge_lora_command = SimpleNamespace(add_arguments=_merge_args, run=_merge)
