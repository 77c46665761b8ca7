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


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/recipes/demo-pretrain.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides such as train.steps=100 optim.lr=1e-4 (values are YAML)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|auto|PATH",
                        help="continue from a checkpoint under train.output_dir/checkpoints ('latest', or 'auto' = "
                             "latest if any, else start fresh) or from a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _train(args: argparse.Namespace) -> int:
    import yaml

    from train.common.config import to_dict
    from train.tokenizer.cli import _setup_logging

    from .config import MLLMTrainConfig

    cfg = MLLMTrainConfig.load(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _setup_logging()
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .trainer import train

    with logging_redirect_tqdm():
        history = train(cfg, resume=args.resume)
    if history:
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
