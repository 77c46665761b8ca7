"""Image-generation speed of UniTokMLLM: ms per generated image position with classifier-free guidance, side by side.

    python benchmarks/bench_mllm_generation.py [--config fixture-a medium] [--threads 2] [--prompts 2]

Random weights (seeded), 2 prompts + 2 unconditional rows (4 rows, as the reference timing), greedy decoding, fp32.
``--prompts B`` times B prompts at once (2B rows: what a server batching requests gets per image). Per config:

* ``growing``: the loop with growing caches (transformers' ``DynamicCache``, the projection's concatenating cache;
  ``generate_image_codes_growing``, what the server's steps compose);
* ``static``: ``generate_image_codes`` — preallocated buffers, fused projections, no host sync per position;
* ``compiled``: the same with ``compile=True`` (``torch.compile`` of the per-position backbone step and the depth step);
* the reference figure recorded beside the fixtures (``fixtures/mllm_ref``), when present, and the best speed-up;
* the weight bytes one position streams (backbone once, depth head and its output K times), the GB/s that gives at
  the best time, and the machine's read bandwidth (``x.sum()`` over 512 MB) measured in the same run.

Every loop must give the growing loop's codes (checked: the target is "faster at equal greedy output"). The opt-in
low-precision paths follow, each with its speed and the share of greedy codes equal to float32's: bf16 (weights and
activations) and int8 weights with fp32 activations (``mllm.quantize``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import mllm.generation as gen
from mllm import UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf
from mllm.quantize import quantize_weights_int8
from train.common.precision import machine_info

FIXTURES = Path(os.environ.get("UNITOK_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
FIXTURE_A = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e4,
                 codebook_size=64, code_dim=4, projection_dim=128, projection_heads=4, image_positions=16,
                 pad_token_id=0)


def reference_figure(name: str) -> float | None:
    try:
        if name == "medium":
            return json.loads((FIXTURES / "mllm_ref/timing_medium.json").read_text())["generation"]["withcache"][
                "ms_per_position"]
        return json.loads((FIXTURES / "mllm_ref/a/meta.json").read_text())["timing"][
            "gen_withcache_cfg_ms_per_image_position"]
    except (OSError, KeyError):
        return None


def read_bandwidth_gbs(repeats: int = 5) -> float:
    x = torch.ones(2 ** 27)  # 512 MB, far beyond the caches
    x.sum()
    t = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return repeats * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def streamed_bytes_per_position(model: UniTokMLLM) -> int:
    """Weights one image position reads: backbone layers and code embedder once, depth layers + output K times."""
    size = lambda m: sum(p.numel() * p.element_size() for p in [*m.parameters(), *m.buffers()]  # noqa: E731
                         if p.dtype != torch.long)
    K = model.config.num_codebooks
    embedder = size(model.code_embedder) - size(model.code_embedder.quantizer)
    return (size(model.model.layers) + embedder
            + K * (size(model.depth_head.layers) + size(model.depth_head.linear_head)))


def build(name: str) -> tuple[UniTokMLLM, torch.Tensor, torch.Tensor]:
    cfg = UniTokMLLMConfig(**FIXTURE_A) if name == "fixture-a" else UniTokMLLMConfig.from_preset(name)
    hf.set_attn_implementation(cfg, "sdpa")
    torch.manual_seed(0)
    model = UniTokMLLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # N(0, 0.02) gives near-uniform logits; draw larger weights like the fixtures
        p.data.normal_(0, 1, generator=g).div_(p.shape[-1] ** 0.5 if p.ndim > 1 else 10).add_(
            1.0 if p.ndim == 1 and p.shape[0] == cfg.hidden_size else 0.0)
    return model, g


def prompts(model: UniTokMLLM, g: torch.Generator, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.randint(5, model.config.vocab_size, (2 * B, 12), generator=g)
    prompt[:, -1] = model.config.boi_token_id
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding on one row
    return prompt, mask


def timed(fn, positions: int, repeats: int) -> tuple[float, torch.Tensor]:
    times, codes = [], None
    for _ in range(repeats + 1):  # the first call warms up (and compiles)
        t = time.perf_counter()
        codes = torch.stack(fn().codes, 2)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1000 / positions, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["fixture-a", "medium"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch (rows = 2 x prompts with CFG)")
    ap.add_argument("--no-low-precision", action="store_true", help="skip the bf16 and int8-weight rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B = args.prompts
    sampling = gen.ImageSampling(cfg_scale=3.0, temperature=0)
    bandwidth = read_bandwidth_gbs()
    info = machine_info()
    print(f"machine: {info.describe()}")
    # emulated bf16 (an AVX2-only CPU) would spend minutes measuring a path no one should take there
    low_paths = ("bf16", "int8 weights") if info.bf16_native else ("int8 weights",)
    print(f"threads={args.threads}  rows={2 * B} ({B} prompts + {B} unconditional)  greedy, cfg 3.0  float32  "
          f"|  read bandwidth (x.sum, 512 MB): {bandwidth:.1f} GB/s")
    print(f"{'config':<10} {'N':>4} {'growing':>8} {'static':>8} {'compiled':>9} {'reference':>10} {'speed-up':>9} "
          f"{'MB/pos':>7} {'GB/s':>6} {'of read bw':>10}   (ms per position)")
    low_precision = []
    for name in args.config:
        model, g = build(name)
        ids, mask = prompts(model, g, B)
        N = model.config.image_positions
        growing, ref_codes = timed(lambda: gen.generate_image_codes_growing(model, ids, mask, sampling), N,
                                   args.repeats)
        static, codes = timed(lambda: gen.generate_image_codes(model, ids, mask, sampling), N, args.repeats)
        compiled, compiled_codes = timed(lambda: gen.generate_image_codes(model, ids, mask, sampling, compile=True), N,
                                         args.repeats)
        for label, c in (("static", codes), ("compiled", compiled_codes)):
            if not torch.equal(c, ref_codes):
                raise SystemExit(f"{name}: the {label} loop changed the greedy output")
        best = min(static, compiled)
        mb = streamed_bytes_per_position(model) / 1e6
        gbs = mb / best  # MB per ms = GB/s
        ref = reference_figure(name) if B == 2 else None  # the reference timed 2 prompts
        ref_s, up = (f"{ref:10.1f}", f"{ref / best:8.1f}x") if ref else (f"{'-':>10}", f"{'-':>9}")
        print(f"{name:<10} {N:>4} {growing:8.2f} {static:8.2f} {compiled:9.2f} {ref_s} {up} {mb:7.1f} {gbs:6.1f} "
              f"{gbs / bandwidth:10.0%}")
        if args.no_low_precision:
            continue
        for label in low_paths:
            low = copy.deepcopy(model)
            if label == "bf16":
                low.to(torch.bfloat16)
            else:
                quantize_weights_int8(low)
            ms, low_codes = timed(lambda: gen.generate_image_codes(low, ids, mask, sampling), N, args.repeats)
            low_precision.append((name, label, ms, static, (low_codes == ref_codes).float().mean().item()))
    if low_precision:
        print(f"\n{'config':<10} {'path':<13} {'ms/pos':>7} {'fp32 static':>12} {'greedy codes = fp32':>20}")
        for name, label, ms, fp32, same in low_precision:
            print(f"{name:<10} {label:<13} {ms:7.2f} {fp32:12.2f} {same:20.1%}")


if __name__ == "__main__":
    main()
