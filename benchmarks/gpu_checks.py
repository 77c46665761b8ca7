"""Every GPU check of the project in one short run: image-generation speed at the released shape, the training step's
MFU with flash-attention 2 and packing, and packed == unpacked under real flash-attention in bf16.

    python benchmarks/gpu_checks.py                      # on the GPU machine (~6-8 min on one H100/H200)
    python benchmarks/gpu_checks.py --shape tiny          # the same logic on tiny shapes, on the CPU (tests)

1. **Generation** (issue "speed"): random weights of the released 7B shape (Llama-2-7B backbone, K=8 x 4096, 256
   positions, 3-layer depth head), bf16, CFG 3: seconds per image at batch 1 and images/s at batch 8 and 32, for the
   static decoder eager and compiled (``mode="reduce-overhead"``: CUDA graphs), plus the growing-cache loop at batch 1;
   and the position loop run under CUDA's sync debug mode ("error"), which names any step that waits on the host.
2. **Training step**: a ~1B backbone (2048 wide, 16 layers), packed rows of mixed samples, flash-attention 2 when
   importable (else sdpa, said so), bf16 autocast, AdamW: tokens/s and MFU against ``--peak-tflops`` (989: H100 SXM
   and H200 dense bf16).
3. **Packing under flash-attention 2** (issue "training correctness"): several packed rows per micro-batch give the loss
   and gradients of the same samples padded (bf16 tolerance), through transformers' real flash-attention path.

It prints the device, the versions and one line per figure, and writes them to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mllm.generation as gen  # noqa: E402
from mllm import IGNORE_INDEX, UniTokMLLM, UniTokMLLMConfig  # noqa: E402
from mllm import hf_compat as hf  # noqa: E402

from bench_mllm_train import measure  # noqa: E402
from train.common.precision import cpu_model  # noqa: E402

SHAPES = {
    # generation model, training backbone, training rows x tokens, generation batches
    "7b": dict(gen=UniTokMLLMConfig.from_preset("unitok-mllm-7b").to_dict(),
               train=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=16),
               rows=8, row_tokens=2048, batches=(1, 8, 32)),
    "tiny": dict(gen=UniTokMLLMConfig.from_preset("tiny").to_dict(),
                 train=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4),
                 rows=2, row_tokens=128, batches=(1, 2)),
}
RELEASED_IMAGE_SIDE = dict(num_codebooks=8, codebook_size=4096, code_dim=8, projection_dim=1024, projection_heads=16,
                           depth_layers=3, image_positions=256)


def config(fields: dict, **overrides) -> UniTokMLLMConfig:
    keep = {f: fields[f] for f in UniTokMLLMConfig.__dataclass_fields__ if f in fields}
    return UniTokMLLMConfig(**{**keep, **overrides})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_model(cfg: UniTokMLLMConfig, device: str, dtype: torch.dtype) -> UniTokMLLM:
    """Built on the device (a 7B init on the host takes minutes), weights N(0, 1/fan_in) so logits are not flat."""
    with torch.device(device):
        model = UniTokMLLM(cfg)
    model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model.eval()


def generation(shape: dict, device: str, dtype: torch.dtype, results: dict) -> None:
    image_side = RELEASED_IMAGE_SIDE if shape["gen"] is SHAPES["7b"]["gen"] else {}
    cfg = config(shape["gen"], **image_side)
    hf.set_attn_implementation(cfg, "sdpa")
    torch.manual_seed(0)
    model = random_model(cfg, device, dtype)
    sampling = gen.ImageSampling(cfg_scale=3.0, temperature=0)
    N = cfg.image_positions

    def prompts(B):
        ids = torch.randint(5, cfg.vocab_size, (2 * B, 16), device=device)
        ids[:, -1] = cfg.boi_token_id
        return ids, torch.ones_like(ids)

    def seconds(fn, ids, mask):
        fn(ids, mask)  # warm-up (compiles)
        sync(device)
        t = time.perf_counter()
        codes = torch.stack(fn(ids, mask).codes, 2)
        sync(device)
        return time.perf_counter() - t, codes

    loops = {"growing": lambda i, m: gen.generate_image_codes_growing(model, i, m, sampling),
             "static": lambda i, m: gen.generate_image_codes(model, i, m, sampling),
             "compiled": lambda i, m: gen.generate_image_codes(model, i, m, sampling, compile=True,
                                                               compile_mode="reduce-overhead" if device == "cuda"
                                                               else None)}
    if device == "cuda":
        sync_error = position_loop_syncs(model, *prompts(1), sampling)
        results["position_loop_host_sync"] = sync_error or "none"
        print(f"generation  host syncs in the position loop: {sync_error or 'none'}", flush=True)
    for B in shape["batches"]:
        ids, mask = prompts(B)
        same = None
        for name, fn in loops.items():
            if name == "growing" and B != 1:
                continue
            s, codes = seconds(fn, ids, mask)
            same = codes if same is None else same
            row = dict(loop=name, batch=B, seconds_per_call=s, images_per_s=B / s, ms_per_position=1000 * s / N,
                       codes_equal_first_loop=bool(torch.equal(codes, same)))
            results.setdefault("generation", []).append(row)
            print(f"generation  batch {B:>3}  {name:<9} {s:8.2f} s/call  {B / s:8.2f} images/s  "
                  f"{1000 * s / N:7.2f} ms/position  codes == first loop: {row['codes_equal_first_loop']}", flush=True)


def position_loop_syncs(model: UniTokMLLM, ids: torch.Tensor, mask: torch.Tensor, sampling) -> str | None:
    """Run the static decoder's position loop with CUDA's sync debug mode set to "error": None if no step made the
    host wait for the device, else the error."""
    from mllm.decoding import StaticImageDecoder

    N = model.config.image_positions
    state = gen.prefill(model, ids, mask)
    decoder = StaticImageDecoder.for_model(model, ids.shape[0], ids.shape[1], N)
    decoder.start(state.cache, mask, state.next_position)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = state.hidden
        for j in range(N):
            codes, _ = gen.sample_position(model, hidden, sampling, decoder=decoder)
            if j < N - 1:
                hidden = decoder.advance(codes)
        return None
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def attention_for_training() -> str:
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def training_step(shape: dict, device: str, results: dict, peak_tflops: float) -> None:
    image_side = RELEASED_IMAGE_SIDE if shape["gen"] is SHAPES["7b"]["gen"] else {}
    cfg = config(UniTokMLLMConfig.from_preset("tiny").to_dict(), **shape["train"], **image_side, vocab_size=32000,
                 max_position_embeddings=4096)
    attn = attention_for_training() if device == "cuda" else "sdpa"
    hf.set_attn_implementation(cfg, attn)
    # bf16 autocast on a GPU; fp32 on a CPU, where bf16 may be emulated (the CPU path checks the logic, not speed)
    r = measure(cfg, "bf16" if device == "cuda" else "fp32", 3, device, shape["rows"], shape["row_tokens"])
    row = dict(attention=attn, params_b=r["params"] / 1e9, tokens_per_s=r["tokens_per_s"], step_s=r["step_ms"] / 1000,
               tflops=r["gflops"] / 1000, mfu=r["gflops"] / 1000 / peak_tflops)
    results["training"] = row
    print(f"training    {row['params_b']:.2f}B params, {attn}, {r['batch']} packed tokens: {r['step_ms']:.0f} ms/step  "
          f"{r['tokens_per_s']:,.0f} tokens/s  {row['tflops']:.1f} TFLOP/s  MFU {row['mfu']:.1%} of {peak_tflops:g}",
          flush=True)


def packing_under_flash_attention(device: str, results: dict) -> None:
    """Three samples packed into 2 rows vs the same samples one per row, padded: loss and gradients."""
    if device == "cuda" and attention_for_training() != "flash_attention_2":
        print("packing     skipped: flash_attn is not installed on this machine")
        results["packing"] = "skipped: no flash_attn"
        return
    from train.data.collate import varlen_kwargs

    cfg = config(UniTokMLLMConfig.from_preset("tiny").to_dict(), hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    with torch.device(device):
        model = UniTokMLLM(cfg)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(5, cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 24, 56)]

    def loss_and_grads(rows: list[list[list[int]]], attn: str):
        hf.set_attn_implementation(cfg, attn)
        width = max(sum(map(len, r)) for r in rows)
        ids, labels, pos = [], [], []
        for r in rows:
            flat = [t for s in r for t in s]
            lab = [t if j else IGNORE_INDEX for s in r for j, t in enumerate(s)]
            p = [j for s in r for j in range(len(s))]
            pad = width - len(flat)
            ids.append(flat + [0] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            pos.append(p + list(range(pad)))
        batch = dict(input_ids=torch.tensor(ids, device=device), labels=torch.tensor(labels, device=device),
                     position_ids=torch.tensor(pos, device=device))
        # no attention mask: the padding sits after each row's samples (causal) and is its own "sample" to varlen
        batch.update({k: v.to(device) if torch.is_tensor(v) else v
                      for k, v in varlen_kwargs(batch["position_ids"].cpu()).items()})
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    attn = "flash_attention_2" if device == "cuda" else "sdpa"
    ref_loss, ref_grads = loss_and_grads([[s] for s in samples], attn)
    pack_loss, pack_grads = loss_and_grads([[samples[0], samples[1]], [samples[2]]], attn)
    worst = max(((pack_grads[n] - g).norm() / (g.norm() + 1e-12)).item() for n, g in ref_grads.items())
    ok = abs(pack_loss - ref_loss) < 2e-2 and worst < 5e-2
    results["packing"] = dict(attention=attn, loss_padded=ref_loss, loss_packed=pack_loss,
                              worst_relative_grad_diff=worst, ok=ok)
    print(f"packing     {attn}: loss padded {ref_loss:.5f} packed {pack_loss:.5f}, worst relative gradient "
          f"difference {worst:.2e}: {'OK' if ok else 'MISMATCH'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--batches", type=int, nargs="+", help="generation batch sizes (default: 1 8 32; tiny: 1 2)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["generation", "training", "packing"])
    ap.add_argument("--out", type=Path, default=Path("gpu_checks.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
               torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
               shape=args.shape, command=" ".join(sys.argv))
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results: dict = {"environment": env}
    shape = {**SHAPES[args.shape], **({"batches": tuple(args.batches)} if args.batches else {})}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if "packing" not in args.skip:
        packing_under_flash_attention(device, results)
    if "training" not in args.skip:
        training_step(shape, device, results, args.peak_tflops)
    if "generation" not in args.skip:
        generation(shape, device, dtype, results)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
