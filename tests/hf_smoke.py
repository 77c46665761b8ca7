"""Smoke of every path that touches transformers / accelerate / peft / datasets, with their deprecation warnings as
errors: forward with labels and backward, a 2-step LoRA training run through the real trainer (accelerate, peft,
datasets), greedy text generation, one CFG image rollout, save/load, released-layout conversion.

``tests/test_hf_compat.py`` runs it on the pinned versions. ``.ci/run`` also runs it as a script in a throwaway venv
with the newest releases (``python tests/hf_smoke.py``); a failure there is the early warning for the next upgrade.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run as a script from a throwaway venv

PACKAGES = ("transformers", "accelerate", "peft", "datasets", "deepspeed", "torch")
LIBRARIES = ("transformers", "accelerate", "peft", "datasets")  # whose deprecations we watch
DEPRECATION = ("deprecat", "will be removed", "renamed")


def _library(path: str) -> str | None:
    return next((lib for lib in LIBRARIES if f"/{lib}/" in path), None)


def _caller_outside(frame) -> str | None:
    """Walking out from ``frame``: past the frames of the library that emitted the deprecation (the first library
    met) and of torch/stdlib plumbing (``nn.Module.__call__``, ``functools``, ``warnings``, ``logging``), the file
    of the first other frame -- ours, or another library (peft calling a deprecated transformers method)."""
    emitter = None
    while frame is not None:
        f = frame.f_code.co_filename
        lib = _library(f)
        if emitter is None and lib is not None:
            emitter = lib
        plumbing = any(part in f for part in ("/torch/", "/logging/", "/warnings.py", "/functools.py",
                                              "/contextlib.py"))
        if not plumbing and (lib is None or lib != emitter):
            return f
        frame = frame.f_back
    return None


def _ours(path: str | None) -> bool:
    return path is not None and path.startswith(str(REPO)) and "site-packages" not in path


class _Collect(logging.Handler):
    """Deprecation notices logged by the libraries (transformers' ``logger.warning_once``), split by call site."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.ours: list[str] = []
        self.upstream: list[str] = []

    def add(self, message: str, caller: str | None) -> None:
        (self.ours if _ours(caller) else self.upstream).append(f"{message}  [called from {caller}]")

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(w in msg.lower() for w in DEPRECATION):
            self.add(f"{record.name}: {msg}", _caller_outside(sys._getframe()))


@contextlib.contextmanager
def deprecations_are_errors(report=print):
    """Deprecations that our code triggers -- a FutureWarning/DeprecationWarning (their ``filename`` is often
    torch's ``Module.__call__``, so the blame comes from the stack), or a library's logged deprecation notice (transformers' once-cache cleared, so an earlier test cannot hide
    one) -- raise an AssertionError. Those triggered inside another library (peft calling a deprecated transformers
    method) are not ours to fix: they are reported, not raised."""
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    for lg in loggers:
        lg.addHandler(collect)
    once = getattr(logging.Logger, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            collect.add(f"{category.__name__}: {message}", _caller_outside(sys._getframe(1)))
        else:
            original(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield collect
    finally:
        for lg in loggers:
            lg.removeHandler(collect)
    for line in dict.fromkeys(collect.upstream):
        report(f"  upstream deprecation (not our call): {line}")
    if collect.ours:
        raise AssertionError("deprecated API used on our code path:\n  " + "\n  ".join(dict.fromkeys(collect.ours)))


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} -")
    return ", ".join(out)


def _tiny_model(vocab_size: int):
    from mllm import UniTokMLLM, UniTokMLLMConfig

    torch.manual_seed(0)
    cfg = UniTokMLLMConfig.from_preset("tiny", vocab_size=vocab_size, num_hidden_layers=2, hidden_size=64,
                                       intermediate_size=128, projection_dim=64, depth_layers=1)
    return UniTokMLLM(cfg)


def _batch(cfg, g: torch.Generator):
    N, K, IMG = cfg.image_positions, cfg.num_codebooks, cfg.image_placeholder_id
    words = torch.randint(5, cfg.vocab_size, (6,), generator=g).tolist()
    ids = torch.tensor([[1, *words[:3], cfg.boi_token_id, *[IMG] * N, cfg.eoi_token_id, *words[3:], 2]])
    labels = torch.tensor([[-100] * 4 + [cfg.boi_token_id, *[IMG] * N, cfg.eoi_token_id, *words[3:], 2]])
    codes = torch.randint(0, cfg.codebook_size, (1, K, N), generator=g)
    return dict(input_ids=ids, labels=labels, image_codes=codes)


def run(workdir: Path) -> list[str]:
    """Every path once; returns a line per step (raises on a failure or a deprecation)."""
    from transformers import AutoTokenizer

    from mllm import MLLMProcessor, UniTokMLLM
    from mllm.convert import convert_released, released_key
    from mllm.generation import ImageSampling, TextSampling, generate_images, generate_text_ids
    from mllm_train_helpers import make_data, write_recipe
    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainer import train

    done = []
    files = make_data(workdir / "data", n=16)
    text_tok = AutoTokenizer.from_pretrained(files["text_tokenizer"])
    with deprecations_are_errors():
        model = _tiny_model(len(text_tok))
        cfg = model.config
        b = _batch(cfg, torch.Generator().manual_seed(0))
        out = model(**b)
        out.loss.backward()
        assert torch.isfinite(out.loss) and model.depth_head.linear_head.weight.grad is not None
        done.append(f"forward with labels + backward: loss {out.loss.item():.4f}")

        base = workdir / "base"
        model.save_pretrained(base)
        text_tok.save_pretrained(base)
        recipe = write_recipe(workdir, files, workdir / "run", train={"steps": 2, "log_every": 1},
                              model={"preset": None, "pretrained": str(base), "overrides": {}},
                              lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
        history = train(MLLMTrainConfig.load(recipe, []))
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        done.append(f"trainer (accelerate + peft LoRA + datasets), 2 steps: loss {history[-1]['loss']:.4f}")

        trained = UniTokMLLM.from_pretrained(workdir / "run" / "final").eval()
        processor = MLLMProcessor(text_tok, trained.config)
        ids = torch.tensor([processor.chat_prompt([{"role": "user", "content": "<image>\nwhat colour is it"}])])
        codes = b["image_codes"]
        greedy = TextSampling(max_new_tokens=6)
        new = generate_text_ids(trained, ids, codes, greedy, eos_token_id=processor.eos_token_id,
                                pad_token_id=processor.pad_token_id)
        # greedy generate (KV cache, image codes on the first step only) == argmax of full forwards, up to eos
        seq = ids
        for _ in range(new.shape[1]):
            logits = trained(input_ids=seq, image_codes=codes).logits[:, -1]
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), 1)
        assert 1 <= new.shape[1] <= 6 and torch.equal(seq[:, ids.shape[1]:], new), (seq[:, ids.shape[1]:], new)
        done.append(f"greedy text (generate == argmax of full forwards): {new[0].tolist()}")

        image = generate_images(trained, processor, ["a red circle"], ImageSampling(cfg_scale=3.0, temperature=1.0),
                                seeds=[7])
        assert image.shape == (1, cfg.num_codebooks, cfg.image_positions)
        assert int(image.min()) >= 0 and int(image.max()) < cfg.codebook_size
        done.append(f"image rollout with CFG: codes {tuple(image.shape)}")

        trained.save_pretrained(workdir / "saved")
        loaded = UniTokMLLM.from_pretrained(workdir / "saved").eval()
        assert torch.equal(trained(**b).loss, loaded(**b).loss)
        done.append("save_pretrained / from_pretrained: equal loss")

        src = workdir / "released"
        src.mkdir()
        llama = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                              "rms_norm_eps", "tie_word_embeddings", "pad_token_id")}
        (src / "config.json").write_text(json.dumps({**llama, "model_type": "mini_gemini", "rope_theta": 10000.0}))
        torch.save({released_key(k): v.clone() for k, v in trained.state_dict().items()}, src / "pytorch_model.bin")
        sizes = {k: getattr(cfg, k) for k in ("num_codebooks", "codebook_size", "code_dim", "projection_dim",
                                              "projection_heads", "depth_layers", "image_positions")}
        convert_released(src, workdir / "converted", **sizes)
        converted = UniTokMLLM.from_pretrained(workdir / "converted").eval()
        assert torch.equal(trained(**b).loss, converted(**b).loss)
        done.append("released-layout conversion: equal loss")
    import deepspeed  # noqa: F401  (the ZeRO paths are exercised by tests/test_distributed.py)

    return done


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    print(f"hf smoke on {versions()}")
    with tempfile.TemporaryDirectory() as tmp:
        for line in run(Path(tmp)):
            print(f"  ok  {line}")
    print("hf smoke passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
