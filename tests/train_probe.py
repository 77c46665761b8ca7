"""Runs ``MLLMTrainer.train_step`` on chosen micro-batches, one process or under ``accelerate launch``, and writes what
the distributed-training tests compare: per-step metrics and the gradients of the first step.

    python tests/train_probe.py RECIPE PLAN OUT

PLAN (JSON): ``{"ranks": [[[["t2i", 0], ["text", 1]], ...], ...]}`` — per rank, per step, per micro-batch the samples
("kind", index): the index-th sample of that kind in the recipe's data stream (read by one process, so every run
draws from the same pool whatever its world size). The trainer's own loader is not used: a test fixes exactly which
rank sees which samples. OUT gets ``metrics.json`` and, with plain DDP/one process, ``grads.safetensors``.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch


def sample_pool(loader, wanted: dict[str, int]) -> dict[str, list]:
    pool: dict[str, list] = defaultdict(list)
    for sample in loader.samples():
        if len(pool[sample.kind]) < wanted.get(sample.kind, 0):
            pool[sample.kind].append(sample)
        if all(len(pool[k]) >= n for k, n in wanted.items()):
            return pool
    raise AssertionError("unreachable: the stream is endless")


def main(recipe: str, plan_file: str, out: str) -> None:
    from train.data.loader import MLLMDataLoader
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainer import MLLMTrainer

    cfg = MLLMTrainConfig.load(recipe)
    trainer = MLLMTrainer(cfg)
    acc, rank = trainer.acc, trainer.acc.process_index
    plan = json.loads(Path(plan_file).read_text())["ranks"]
    assert len(plan) == acc.num_processes, (len(plan), acc.num_processes)
    wanted: dict[str, int] = defaultdict(int)
    for steps in plan:
        for step in steps:
            for micro in step:
                for kind, i in micro:
                    wanted[kind] = max(wanted[kind], i + 1)
    pool = sample_pool(MLLMDataLoader(cfg.data, trainer.processor), wanted)
    collate = trainer.loader.collator
    mine = plan[rank]
    batches = iter([collate([pool[k][i] for k, i in micro]) for step in mine for micro in step])

    grads = {}
    inner = trainer.opt.optimizer
    real_step = inner.step

    def capture_then_step(*args, **kwargs):
        if not grads:
            for name, p in trainer.model.named_parameters():
                if p.grad is not None:
                    grads[name.removeprefix("module.")] = p.grad.detach().clone()
        return real_step(*args, **kwargs)

    inner.step = capture_then_step
    trainer.model.train()
    metrics = [trainer.train_step(batches) for _ in mine]
    if acc.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        if grads:
            from safetensors.torch import save_file

            save_file(grads, str(Path(out) / "grads.safetensors"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
