"""Encode / decode throughput of UniTok presets (random weights) on this machine.

    python benchmarks/bench_tokenizer.py --preset tiny unitok-large --batch-size 4 [--dtype bf16]

Prints images/s for ``encode`` (pixels -> codes) and ``decode`` (codes -> pixels), the median of a few runs
after a warm-up. bf16 autocast is available for CPUs with native bf16 and for GPUs (never fp16 on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenizer import UniTok, UniTokConfig
from train.common.precision import machine_info


def bench(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["tiny", "unitok-large"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cpu":
        print(f"machine: {machine_info().describe()}")
    print(f"device={args.device} threads={torch.get_num_threads()} dtype={args.dtype} batch={args.batch_size}")
    print(f"{'preset':<14}{'params':>10}{'px':>6}{'K x N':>10}{'encode img/s':>15}{'decode img/s':>15}")
    for name in args.preset:
        torch.manual_seed(0)
        model = UniTok(UniTokConfig.from_preset(name)).to(args.device).eval()
        c = model.config
        x = torch.rand(args.batch_size, 3, c.image_size, c.image_size, device=args.device) * 2 - 1
        amp = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        with torch.inference_mode(), amp:
            codes = model.encode(x)
            t_enc = bench(lambda: model.encode(x), args.repeats)
            t_dec = bench(lambda: model.decode(codes), args.repeats)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<14}{n / 1e6:>9.1f}M{c.image_size:>6}{f'{c.num_codebooks}x{c.num_positions}':>10}"
              f"{args.batch_size / t_enc:>15.2f}{args.batch_size / t_dec:>15.2f}")
        del model


if __name__ == "__main__":
    main()
