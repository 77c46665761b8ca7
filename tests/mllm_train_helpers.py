"""Small on-disk fixtures for MLLM training tests: a sentencepiece text tokenizer, caption pairs with codes, text,
and a recipe YAML for the `tiny` preset (shrunk further so each step takes milliseconds)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = "a red green blue circle square triangle on the left right of what colour is it how many two one three".split()


def make_data(root: Path, n: int = 64, seed: int = 0, vary: bool = True) -> dict[str, Path]:
    from train.text_tokenizer import train_sentencepiece

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    caps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8) if vary else 5)) for _ in range(n)]
    if not (root / "text" / "tokenizer.model").is_file():
        train_sentencepiece([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5 + caps,
                            root / "text", vocab_size=320)
    with open(root / "pairs.jsonl", "w") as f:
        for c in caps:
            f.write(json.dumps({"text": c, "codes": [[rng.randrange(256) for _ in range(16)] for _ in range(8)]}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for c in caps:
            f.write(json.dumps({"text": c + " and " + c}) + "\n")
    return {"text_tokenizer": root / "text", "pairs": root / "pairs.jsonl", "text": root / "text.jsonl"}


def write_recipe(root: Path, files: dict[str, Path], out: Path, **sections) -> Path:
    recipe = {
        "model": {"preset": "tiny", "text_tokenizer": str(files["text_tokenizer"]), "attn_implementation": "sdpa",
                  "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "projection_dim": 64,
                                "projection_heads": 2, "depth_layers": 1}},
        "data": {"batching": "pack", "batch_size": 2, "max_tokens": 96, "num_workers": 0, "seed": 1,
                 "sources": [{"name": "pairs", "kind": "caption", "paths": [str(files["pairs"])], "t2i_ratio": 0.5},
                             {"name": "text", "kind": "text", "paths": [str(files["text"])], "weight": 0.5}]},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
        # fp32 on every CPU: the tests compare runs' exact numbers (auto would pick bf16 where it is native)
        "train": {"steps": 10, "save_every": 100, "log_every": 1, "output_dir": str(out), "progress": False,
                  "tensorboard": False, "mixed_precision": "no"},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = root / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    from train.common.tracking import read_jsonl_metrics

    return {int(r["step"]): r["train/loss"] for r in read_jsonl_metrics(run_dir / "logs" / "metrics.jsonl")
            if "train/loss" in r}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a test's server or a torchrun master)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unitok_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "unitok_cli", *args]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run(unitok_cmd(*args), cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"unitok {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def write_tiny_pair(root: Path, spread: float = 0.0) -> Path:
    """A saved tiny MLLM (``root/mllm``, with a sentencepiece text tokenizer) and a tiny UniTok (``root/unitok``)
    that fit each other. ``spread`` > 0 rescales the MLLM's random weights (std ``spread / sqrt(fan_in)``) so that
    its logits have clear winners: greedy outputs are then stable under float reassociation (batching tests), and
    replies are words."""
    import torch
    from transformers import AutoTokenizer

    from mllm import UniTokMLLM, UniTokMLLMConfig
    from tokenizer import UniTok, UniTokConfig
    from train.text_tokenizer import train_sentencepiece

    words = "a red green blue circle square triangle on the left right of what colour is it how many two".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 10
    tok_dir = train_sentencepiece(texts, root / "text", vocab_size=320)
    text_tok = AutoTokenizer.from_pretrained(tok_dir)
    unitok = UniTok(UniTokConfig.from_preset("tiny"))
    unitok.save_pretrained(root / "unitok")
    cfg = UniTokMLLMConfig.from_preset("tiny", vocab_size=len(text_tok))
    torch.manual_seed(0)
    m = UniTokMLLM(cfg)
    m.load_tokenizer_weights(unitok)
    if spread:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * spread)
            # byte-fallback pieces (boi/eoi among them) get logit 0 against words' ~N(0, spread^2): replies are
            # words, not runs of bytes that are invalid UTF-8 (whose decoding is not prefix-stable)
            m.lm_head.weight[3:259] = 0
    m.save_pretrained(root / "mllm")
    text_tok.save_pretrained(root / "mllm")
    return root
