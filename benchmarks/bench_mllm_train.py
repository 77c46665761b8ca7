"""MLLM training throughput: tokens/s and the fraction of this machine's fp32 matmul peak reached.

    python benchmarks/bench_mllm_train.py [--config medium tiny] [--precision fp32 bf16] [--rows R --row-tokens T]

One optimiser step = forward + backward + AdamW on a packed micro-batch (rows of tokens, each row holding
text->image, image->text and text-only samples, position ids restarting per sample), random weights, in fp32 and
with bf16 autocast (where this machine runs bf16 natively), side by side. Model FLOPs are counted analytically (6 x
parameters touched per token for matmuls, plus attention scores), so MFU = achieved FLOP/s / peak, each precision
against its own peak: this CPU's fp32 and bf16 matmul speed, measured by the 512-square probe of
train.common.precision (and printed with the machine), or ``--peak-gflops FP32 BF16`` (a GPU's datasheet). ``tiny``
is the demo's model at the demo's micro-batch (16 rows x 256 tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mllm import IGNORE_INDEX, UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf
from train.data.collate import varlen_kwargs
from train.common.precision import machine_info
from train.mllm.config import MLLMTrainConfig


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


# config -> (rows, tokens per row): medium as the reference timing; tiny as the demo's micro-batch (16 x 256, packed)
BATCHES = {"medium": (4, 512), "tiny": (16, 256)}
PRECISIONS = ("fp32", "bf16")


def measure(cfg: UniTokMLLMConfig, precision: str, steps: int, device: str, rows: int, row_tokens: int) -> dict:
    """Median step time of a random-weight model of ``cfg`` (its attention implementation as set) on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: a ~1B host init takes minutes
        model = UniTokMLLM(cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device == "cuda")
    batch = packed_batch(cfg, rows, row_tokens)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    times, out = [], None
    for i in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
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
    return dict(precision=precision, params=sum(p.numel() for p in model.parameters()), batch=f"{rows} x {row_tokens}",
                step_ms=step * 1000, tokens_per_s=batch["input_ids"].numel() / step, gflops=flops / step / 1e9,
                loss=out.loss.item())


def demo_model_overrides() -> dict:
    """The demo's changes to the ``tiny`` preset, read from its recipe (so this measures the model `unitok demo`
    trains); the chat template is not architecture."""
    recipe = MLLMTrainConfig.load(Path(__file__).resolve().parents[1] / "configs/recipes/demo-pretrain.yaml")
    return {k: v for k, v in recipe.model.overrides.items() if k != "chat_template"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["medium", "tiny"])
    ap.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                    help="default: fp32, and bf16 where this machine runs it natively (a GPU, or a CPU with "
                         "AVX512-BF16/AMX); emulated bf16 would take minutes a step")
    ap.add_argument("--rows", type=int, help="rows per micro-batch (default: per config, see BATCHES)")
    ap.add_argument("--row-tokens", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-gflops", type=float, nargs=2, metavar=("FP32", "BF16"),
                    help="matmul peaks to measure against (default: this CPU's, measured by the 512-square "
                         "matmul probe; a GPU's datasheet)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.peak_gflops:
        peaks = dict(zip(PRECISIONS, args.peak_gflops))
        precisions = args.precision or list(PRECISIONS)
    elif device == "cpu":
        info = machine_info()
        print(f"machine: {info.describe()}")
        peaks = {"fp32": info.fp32_gflops, "bf16": info.bf16_gflops}
        precisions = args.precision or (list(PRECISIONS) if info.bf16_native else ["fp32"])
    else:
        raise SystemExit("on a GPU, give its datasheet's --peak-gflops FP32 BF16")
    print(f"{torch.get_num_threads()} threads, {device}; one step = forward + backward + AdamW on packed rows")
    print(f"{'config':<8} {'params':>7} {'batch':>9} {'precision':>9} {'step ms':>8} {'tokens/s':>9} "
          f"{'GFLOP/s':>8} {'of peak':>14} {'loss':>7}")
    for name in args.config:
        rows, row_tokens = BATCHES.get(name, (4, 512))
        overrides = demo_model_overrides() if name == "tiny" else {}  # the demo's tiny model
        cfg = UniTokMLLMConfig.from_preset(name, **overrides)
        hf.set_attn_implementation(cfg, "sdpa")
        for precision in precisions:
            r = measure(cfg, precision, args.steps, device, args.rows or rows, args.row_tokens or row_tokens)
            share = f"{r['gflops'] / peaks[precision]:.1%} of {peaks[precision]:g}"
            print(f"{name:<8} {r['params'] / 1e6:6.1f}M {r['batch']:>9} {precision:>9} {r['step_ms']:8.0f} "
                  f"{r['tokens_per_s']:9,.0f} {r['gflops']:8.1f} {share:>14} {r['loss']:7.3f}", flush=True)


if __name__ == "__main__":
    main()
