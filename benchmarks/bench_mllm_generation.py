"""Image-generation speed of UniTokMLLM: ms per generated image position with classifier-free guidance.

    python benchmarks/bench_mllm_generation.py [--config medium fixture-a] [--threads 2] [--prompts 2]

Random weights (seeded), 2 prompts + 2 unconditional rows (4 rows, as the reference timing), greedy decoding;
``--prompts B`` times B prompts at once (2B rows: what a server batching requests gets per image).
For each config it prints:

* ``ours``: the cached loop of ``mllm.generation`` (backbone KV cache, depth-head static KV cache with the linear
  head on the newest slot only, projection KV cache);
* ``hf-layers``: the same loop with the depth head run through its transformers layers and a ``DynamicCache``
  (what a straightforward cached implementation costs);
* the reference figures recorded beside the fixtures (``fixtures/mllm_ref``), when present, and the speed-up.

Both loops must produce identical codes (checked, since the target is "faster at equal greedy output").
``--dtype bfloat16`` runs the same loops in bf16 and prints how many greedy codes still equal float32's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import mllm.generation as gen
from mllm import UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf

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


def hf_layers_sample_position(model, hidden, sampling, generators=None):
    """``gen.sample_position`` with the depth head's transformers layers and a DynamicCache."""
    head, K = model.depth_head, model.config.num_codebooks
    cache, x, codes, logits_all = hf.new_dynamic_cache(model.config), hidden[:, None], [], []
    for k in range(K):
        logits = head.linear_head(head(x, cache)[:, -1]).float()
        cond, uncond = logits.chunk(2)
        logits = uncond + sampling.cfg_scale * (cond - uncond)
        code = gen.choose(logits, sampling, generators)
        code = torch.cat((code, code))
        codes.append(code)
        logits_all.append(logits)
        if k < K - 1:
            x = head.codebooks[k](code)[:, None]
    return torch.stack(codes, 1), torch.stack(logits_all, 1)


def run(model: UniTokMLLM, ids, mask, repeats: int) -> tuple[float, torch.Tensor]:
    sampling = gen.ImageSampling(cfg_scale=3.0, temperature=0)
    times, codes = [], None
    for _ in range(repeats + 1):
        t = time.perf_counter()
        state = gen.generate_image_codes(model, ids, mask, sampling)
        times.append(time.perf_counter() - t)
        codes = torch.stack(state.codes, 2)
    return statistics.median(times[1:]) * 1000 / model.config.image_positions, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["fixture-a", "medium"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch (rows = 2 x prompts with CFG)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and activations; bfloat16 also reports whether the greedy codes equal float32's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B = args.prompts
    dtype = getattr(torch, args.dtype)
    print(f"threads={args.threads}  rows={2 * B} ({B} prompts + {B} unconditional)  greedy, cfg 3.0  {args.dtype}")
    print(f"{'config':<10} {'N':>4} {'ours ms/pos':>12} {'per image':>10} {'hf-layers':>10} {'reference':>10} "
          f"{'speed-up':>9}")
    for name in args.config:
        cfg = UniTokMLLMConfig(**FIXTURE_A) if name == "fixture-a" else UniTokMLLMConfig.from_preset(name)
        hf.set_attn_implementation(cfg, "sdpa")
        torch.manual_seed(0)
        model = UniTokMLLM(cfg).eval()
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():  # N(0, 0.02) gives near-uniform logits; draw larger weights like the fixtures
            p.data.normal_(0, 1, generator=g).div_(p.shape[-1] ** 0.5 if p.ndim > 1 else 10).add_(
                1.0 if p.ndim == 1 and p.shape[0] == cfg.hidden_size else 0.0)
        prompt = torch.randint(5, cfg.vocab_size, (2 * B, 12), generator=g)
        prompt[:, -1] = cfg.boi_token_id
        mask = torch.ones_like(prompt)
        mask[1, :3] = 0  # left padding on one row
        if dtype != torch.float32:  # halves the weight bytes streamed per step; rounding may flip an argmax
            _, fp32_codes = run(model, prompt, mask, 1)
            model.to(dtype)
        ours, codes = run(model, prompt, mask, args.repeats)
        if dtype != torch.float32:
            same = (codes == fp32_codes).float().mean().item()
            print(f"{name}: {args.dtype} greedy codes equal to float32's: {same:.1%}")
        original = gen.sample_position
        gen.sample_position = hf_layers_sample_position
        try:
            slow, slow_codes = run(model, prompt, mask, max(1, args.repeats // 2))
        finally:
            gen.sample_position = original
        if not torch.equal(codes, slow_codes):
            raise SystemExit(f"{name}: the fast depth decoder changed the greedy output")
        ref = reference_figure(name) if B == 2 else None  # the reference timed 2 prompts
        ref_s = f"{ref:10.1f}" if ref else f"{'-':>10}"
        up = f"{ref / ours:8.1f}x" if ref else f"{'-':>9}"
        print(f"{name:<10} {cfg.image_positions:>4} {ours:12.2f} {ours / B:10.2f} {slow:10.2f} {ref_s} {up}")


if __name__ == "__main__":
    main()
