"""MLLM training throughput: tokens/s and the fraction of this machine's fp32 matmul peak reached.

    python benchmarks/bench_mllm_train.py [--config medium] [--rows 4 --row-tokens 512] [--peak-gflops 190]

One optimiser step = forward + backward + AdamW on a packed micro-batch (rows of ``--row-tokens`` tokens, each row
holding text->image, image->text and text-only samples, position ids restarting per sample), random weights, fp32
(bf16 autocast with ``--bf16``). Model FLOPs are counted analytically (6 x parameters touched per token for
matmuls, plus attention scores), so MFU = achieved FLOP/s / peak. The peak default is the measured fp32 matmul peak
of the 2-core CPU in notes/env_feasibility.md §5 (use ~405 for bf16 there, or the GPU's datasheet peak).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mllm import IGNORE_INDEX, UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf
from train.data.collate import varlen_kwargs


def packed_batch(cfg: UniTokMLLMConfig, rows: int, row_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, img = cfg.image_positions, cfg.image_placeholder_id
    ids, labels, pos, images = [], [], [], []
    for _ in range(rows):
        r_ids, r_lab, r_pos = [], [], []
        kind = 0
        while True:
            text = torch.randint(5, cfg.vocab_size, (24,), generator=g).tolist()
            if kind == 0:  # text -> image
                s = [1, *text, 3, *[img] * N, 4, 2]
                lab = [IGNORE_INDEX] * (len(text) + 1) + [3, *[img] * N, 4, 2]
            elif kind == 1:  # image -> text
                s = [1, 3, *[img] * N, 4, *text, 2]
                lab = [IGNORE_INDEX] * (N + 3) + [*text, 2]
            else:
                s = [1, *text, *text, 2]
                lab = list(s)
            if len(r_ids) + len(s) > row_tokens:
                break
            lab[0] = IGNORE_INDEX
            if kind < 2:
                images.append(torch.randint(0, cfg.codebook_size, (cfg.num_codebooks, N), generator=g))
            r_ids += s
            r_lab += lab
            r_pos += list(range(len(s)))
            kind = (kind + 1) % 3
        pad = row_tokens - len(r_ids)
        ids.append(r_ids + [0] * pad)
        labels.append(r_lab + [IGNORE_INDEX] * pad)
        r_pos += list(range(pad))
        pos.append(r_pos)
    position_ids = torch.tensor(pos)
    return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=position_ids,
                image_codes=torch.stack(images), **varlen_kwargs(position_ids))


def model_flops(model: UniTokMLLM, batch: dict, out) -> float:
    cfg = model.config
    T = batch["input_ids"].numel()  # every position (padding included) runs the backbone
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    depth_layer_params = sum(p.numel() for p in model.depth_head.layers.parameters())
    flops = 6 * layer_params * T
    # attention scores/values: causal within each packed sample (block-diagonal)
    pos = batch["position_ids"]
    ctx = float((pos + 1).float().mean())  # mean number of keys per query
    flops += 6 * 2 * cfg.num_hidden_layers * T * ctx * cfg.num_attention_heads * cfg.head_dim
    flops += 6 * cfg.hidden_size * cfg.vocab_size * out.n_text_tokens  # LM head on text targets only
    n_img_rows = out.n_image_subcodes  # = image positions x K depth slots
    flops += 6 * depth_layer_params * n_img_rows + 6 * cfg.hidden_size * cfg.codebook_size * n_img_rows
    embed_params = sum(p.numel() for n, p in model.code_embedder.named_parameters() if "quantizer" not in n)
    flops += 6 * embed_params * batch["image_codes"].shape[0] * cfg.image_positions
    return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="medium")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--row-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--peak-gflops", type=float, default=190.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = UniTokMLLMConfig.from_preset(args.config)
    hf.set_attn_implementation(cfg, "sdpa")
    torch.manual_seed(0)
    model = UniTokMLLM(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = packed_batch(cfg, args.rows, args.row_tokens)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = batch["input_ids"].numel()
    times, out = [], None
    for i in range(args.steps + 1):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(**batch, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    flops = model_flops(model, batch, out)
    print(f"config {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.rows} rows x "
          f"{args.row_tokens} tokens ({batch['image_codes'].shape[0]} images, {out.n_text_tokens} text targets, "
          f"{out.n_image_subcodes} sub-code targets), {'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} "
          f"threads, {device}")
    print(f"step {step * 1000:.0f} ms  |  {tokens / step:,.0f} tokens/s  |  {flops / step / 1e9:.1f} GFLOP/s model  "
          f"|  {flops / step / 1e9 / args.peak_gflops:.1%} of {args.peak_gflops:g} GFLOP/s peak")


if __name__ == "__main__":
    main()
