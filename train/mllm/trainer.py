"""MLLM training loop on accelerate (DDP, or DeepSpeed ZeRO-2/3 from a JSON config), composed of small pieces:

    build_model      weights from a preset / our folder / a Llama checkpoint; code embedder from the UniTok tokenizer
    freeze / LoRA    parameter-name prefixes frozen; peft adapters on the backbone, embedder and depth head fully trained
    build_accelerator  mixed precision, gradient accumulation, DeepSpeed config with every "auto" filled explicitly
    MLLMTrainer      one optimiser step = grad_accum micro-batches from MLLMDataLoader; atomic checkpoints with the
                     model, optimiser, scheduler, RNG states and the exact data position; export at the end

Resume is exact: a run restarted from a checkpoint sees the same batches and RNG streams as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
import torch
from torch import nn

import configs

from mllm import MLLMProcessor, UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf
from mllm.configuration import image_side_from_tokenizer
from train.common.checkpoint import CheckpointManager, capture_rng_state, check_world_size, inject_fault, load_state, \
    read_meta, restore_rng_state, save_state
from tokenizer.checkpoint import claim_output
from train.common.config import save_yaml
from train.common.optim import build_adamw
from train.common.precision import log_precision, resolve_precision
from train.common.schedule import warmup_cosine_scheduler
from train.common.tracking import MetricsWriter, progress_bar
from train.data.loader import MLLMDataLoader

from .config import MLLMTrainConfig

logger = logging.getLogger(__name__)
# what a run writes into train.output_dir
RUN_OUTPUTS = ("checkpoints", "snapshots", "final", "logs", "config.yaml", "wandb")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


# ================================================================================================ model
def attn_implementation(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(cfg: MLLMTrainConfig):
    """-> (model, processor, unitok or None)."""
    from transformers import AutoTokenizer

    from tokenizer import UniTok

    m = cfg.model
    unitok = UniTok.from_pretrained(m.tokenizer).eval() if m.tokenizer else None
    text_dir = m.text_tokenizer or m.pretrained or m.llama
    if text_dir is None:
        raise ValueError("model.text_tokenizer is required with model.preset (a folder AutoTokenizer can read)")
    text_tokenizer = AutoTokenizer.from_pretrained(text_dir)
    attn = attn_implementation(m.attn_implementation)
    if m.pretrained:
        model = UniTokMLLM.from_pretrained(m.pretrained, attn_implementation=attn, dtype=torch.float32)
    else:
        image_side = image_side_from_tokenizer(unitok.config) if unitok is not None else {}
        if m.llama:
            model = UniTokMLLM.from_llama(m.llama, unitok=unitok, **{**image_side, **m.overrides})
        else:
            config = UniTokMLLMConfig.from_preset(m.preset, **{"vocab_size": len(text_tokenizer), **image_side,
                                                                **m.overrides})
            model = UniTokMLLM(config)
            if unitok is not None:
                model.load_tokenizer_weights(unitok)
        hf.set_attn_implementation(model.config, attn)
    model.config.use_cache = False
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    processor = MLLMProcessor(text_tokenizer, model.config, max_length=cfg.data.max_tokens)
    return model, processor, unitok


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"model.freeze: no parameter starts with {prefix!r} (e.g. 'model.', 'lm_head.', "
                             f"'code_embedder.', 'depth_head.')")
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)


def lora_config(cfg: MLLMTrainConfig):
    from peft import LoraConfig

    lc = cfg.lora
    # adapters on the backbone's projections only: the depth head has layers with the same names
    target = rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(lc.target_modules)})"
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=target,
                      modules_to_save=list(lc.full_modules) or None, bias="none")


def apply_lora(model: UniTokMLLM, cfg: MLLMTrainConfig):
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(cfg))
    for p in peft_model.base_model.model.code_embedder.quantizer.parameters():
        p.requires_grad_(False)  # a modules_to_save copy of the embedder must keep the codebooks frozen
    return peft_model


# ================================================================================================ launch
def deepspeed_plugin(cfg: MLLMTrainConfig, world_size: int):
    """The JSON config with every ``"auto"`` replaced by this recipe's value (accelerate cannot infer them here:
    batches come from our own loader), and gradient clipping always explicit (DeepSpeed defaults to 1.0)."""
    from accelerate.utils import DeepSpeedPlugin

    path = configs.resolve(cfg.train.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: no DeepSpeed config at {path}")
    ds = json.loads(path.read_text())
    micro = cfg.data.batch_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = micro * cfg.train.grad_accum * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    bf16 = mllm_precision(cfg)[0] == "bf16"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {})  # bucket-size "auto"s: accelerate fills them from hidden_size
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW works with offload
    return DeepSpeedPlugin(hf_ds_config=ds)


def mllm_precision(cfg: MLLMTrainConfig) -> tuple[str, str]:
    """:func:`resolve_precision`, except that ``auto`` keeps DeepSpeed on a CPU (a test setup) in fp32: DeepSpeed's
    bf16 mode is not autocast but bf16 weights, which the code embedder's fp32 codebook lookup does not take."""
    precision, why = resolve_precision(cfg.train.mixed_precision)
    if (precision == "bf16" and cfg.train.mixed_precision == "auto" and cfg.train.deepspeed
            and not torch.cuda.is_available()):
        return "no", "auto: DeepSpeed on a CPU trains in fp32 (its bf16 mode casts the weights)"
    return precision, why


def build_accelerator(cfg: MLLMTrainConfig):
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # the model runs every trainable submodule on every step (weight-0 passes for parts a batch lacks), so DDP needs
    # no unused-parameter search; a parameter left out would fail the step loudly instead of hanging ZeRO-3
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    plugin, scope = None, contextlib.nullcontext()
    if cfg.train.deepspeed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugin = deepspeed_plugin(cfg, world)
        if not torch.cuda.is_available():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            scope = without_deepspeed_shm_build()
    # a run of its own: accelerate keeps one state per process, which an earlier run in this process (the demo's
    # fp32 tokenizer stage, a test) would otherwise have fixed, precision included
    AcceleratorState._reset_state()
    with scope:  # the process group (and DeepSpeed's communication backend) is created here
        return Accelerator(mixed_precision=log_precision(mllm_precision(cfg), "MLLM training"),
                           gradient_accumulation_steps=cfg.train.grad_accum,
                           deepspeed_plugin=plugin, kwargs_handlers=handlers, step_scheduler_with_optimizer=False)


@contextlib.contextmanager
def without_deepspeed_shm_build():
    """DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op (used for inference only) when it is
    created: a ~30 s C++ build on a CPU machine (seen with deepspeed 0.19.8). Skip that build for the backend created
    inside this block only, and restore DeepSpeed's function after it."""
    import importlib

    # by path: the attribute deepspeed.comm.torch is the torch package that deepspeed.comm imports
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = original


# ================================================================================================ trainer
class MLLMTrainer:
    def __init__(self, cfg: MLLMTrainConfig, resume: str | None = None, accelerator=None,
                 overwrite: bool = False) -> None:
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.acc = accelerator if accelerator is not None else build_accelerator(cfg)
        set_seed(cfg.train.seed)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_last, self.acc.is_main_process,
                                      self.acc.wait_for_everyone)
        resume_path = self.ckpt.resolve(resume) if resume else None
        if resume_path is not None:  # before the model is built: a wrong launch costs nothing and touches nothing
            check_world_size(resume_path, self.acc.num_processes)
        else:  # a new run never mixes with (or silently replaces) an earlier one in the same folder
            claim_output(self.out_dir, overwrite, RUN_OUTPUTS, "continue it with --resume", self.acc.is_main_process)
            self.acc.wait_for_everyone()
        model, self.processor, self.unitok = build_model(cfg)
        if self.unitok is not None:
            self.unitok.to(self.acc.device)
        freeze(model, cfg.model.freeze)
        if cfg.lora.enabled:
            model = apply_lora(model, cfg)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total_params = sum(p.numel() for p in model.parameters())
        opt = build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), cfg.optim.eps)
        sched = warmup_cosine_scheduler(opt, cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        self.model, self.opt, self.sched = self.acc.prepare(model, opt, sched)
        self.loader = MLLMDataLoader(cfg.data, self.processor, rank=self.acc.process_index,
                                     world_size=self.acc.num_processes, image_tokenizer=self.unitok)
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []
        if resume_path is not None:
            self._load(resume_path)
        self.writer = MetricsWriter(self.out_dir / "logs", enabled=self.acc.is_main_process,
                                    tensorboard=cfg.train.tensorboard)
        self.wandb = None
        if cfg.train.wandb and self.acc.is_main_process:
            try:
                import wandb

                self.wandb = wandb.init(project="unitok-mllm", dir=str(self.out_dir), resume="allow")
            except ImportError:
                logger.warning("train.wandb is on but wandb is not installed: logging to TensorBoard only")

    # -------------------------------------------------------------------------------------------- one step
    def train_step(self, batches) -> dict[str, float]:
        """grad_accum micro-batches -> one optimiser step. Returns metrics over the whole step (all ranks).

        Every supervised item of the step (text target or image sub-code, over every micro-batch and rank) weighs
        the same: each micro-batch's loss sum is divided by ``items / (grad_accum x processes)`` (the
        ``num_items_in_batch`` the model takes), which the backward's 1/grad_accum and the cross-rank gradient mean
        turn into ``Σ / items``. The gradient of a global batch is then the same however it is split."""
        cfg, acc = self.cfg, self.acc
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        K = self.processor.config.num_codebooks
        counts = torch.tensor([[float(b["counts"][k]) for k in ("text_targets", "image_targets", "tokens")]
                               for b in micro], device=acc.device).sum(0)
        counts = acc.reduce(counts, "sum")  # one small all-reduce: the step's items on every rank
        items = float(counts[0] + K * counts[1])
        per_micro = items / (cfg.train.grad_accum * acc.num_processes)
        sums = torch.zeros(3, device=acc.device)  # loss, text CE sum, image loss sum
        for batch in micro:
            batch.pop("counts")
            batch = {k: v.to(acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with acc.accumulate(self.model):
                out = self.model(**batch, use_cache=False, num_items_in_batch=per_micro)
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.optim.grad_clip > 0 and not self._deepspeed:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.opt.step()
                if acc.sync_gradients:
                    self.sched.step()
                self.opt.zero_grad(set_to_none=True)
            zero = out.loss.new_zeros(())
            sums += torch.stack([out.loss.detach().float(),
                                 (out.text_loss * out.n_text_tokens if out.text_loss is not None else zero).detach(),
                                 (out.image_loss * out.n_image_subcodes if out.image_loss is not None
                                  else zero).detach()]).float()
        sums = acc.reduce(sums, "sum")
        text_targets, image_targets = counts[0].item(), counts[1].item()
        return {"loss": sums[0].item() / (cfg.train.grad_accum * acc.num_processes),
                "text_loss": sums[1].item() / max(text_targets, 1.0),
                "image_loss": sums[2].item() / max(K * image_targets, 1.0),
                "text_targets": text_targets, "image_targets": image_targets, "tokens": counts[2].item(),
                "lr": self.sched.get_last_lr()[0]}

    @property
    def _deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.DEEPSPEED

    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.out_dir / "config.yaml")
            global_batch = cfg.data.batch_size * cfg.train.grad_accum * self.acc.num_processes
            unit = "packed rows" if cfg.data.batching == "pack" else "samples"
            logger.info("processes %d (%s), micro-batch %d %s x grad_accum %d -> %d %s per step%s",
                        self.acc.num_processes, self.acc.distributed_type, cfg.data.batch_size, unit,
                        cfg.train.grad_accum, global_batch, unit,
                        f" (<= {global_batch * cfg.data.max_tokens} tokens)" if cfg.data.batching == "pack" else "")
            logger.info("parameters: %.2fM trainable of %.2fM", self.trainable / 1e6, self.total_params / 1e6)
            logger.info("data:\n%s", self.loader.describe())
        bar = progress_bar(cfg.train.steps, self.step, enabled=self.acc.is_main_process and cfg.train.progress,
                           desc="train")
        batches = iter(self.loader)
        self.model.train()
        window_tokens, window_t0 = 0.0, time.perf_counter()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics = self.train_step(batches)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            window_tokens += metrics["tokens"]
            metrics["step"] = self.step
            self.history.append(metrics)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                elapsed = max(time.perf_counter() - window_t0, 1e-9)
                metrics["tokens_per_s"] = window_tokens / elapsed
                window_tokens, window_t0 = 0.0, time.perf_counter()
                metrics.update({f"data/{k}": v for k, v in self.loader.stats.as_dict().items()})
                self.writer.scalars(self.step, {k: v for k, v in metrics.items() if k != "step"}, prefix="train/")
                if self.wandb is not None:
                    self.wandb.log(metrics, step=self.step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", text=f"{metrics['text_loss']:.3f}",
                                image=f"{metrics['image_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            t = time.perf_counter()  # writes are kept out of the throughput window
            if self.step % cfg.train.save_every == 0 and self.step < cfg.train.steps:
                self.save_checkpoint()
            if cfg.train.snapshot_every and self.step % cfg.train.snapshot_every == 0 and self.step < cfg.train.steps:
                self.export(self.out_dir / "snapshots" / f"step_{self.step:06d}")  # the last step's is `final`
            window_t0 += time.perf_counter() - t
            inject_fault(self.step)
        bar.close()
        self.save_checkpoint()
        self.export(self.out_dir / "final")
        self.writer.close()
        return self.history

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        rank = self.acc.process_index

        def write(tmp: Path) -> None:
            self.acc.save_state(str(tmp / "accelerate"))
            save_state({"rng": capture_rng_state(), "data": self.loader.state_dict()}, tmp / f"rank{rank:05d}.pt")

        path = self.ckpt.save(self.step, write, meta={"train_seconds": self.train_seconds,
                                                      "world_size": self.acc.num_processes})
        logger.info("saved checkpoint %s", path)
        return path

    def _load(self, path: Path) -> None:
        meta = read_meta(path)
        self.acc.load_state(str(path / "accelerate"))
        state = load_state(path / f"rank{self.acc.process_index:05d}.pt")
        self.loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        self.step = int(meta["step"])
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        logger.info("resumed from %s at step %d", path, self.step)

    def export(self, path: Path) -> Path:
        """Our ``save_pretrained`` folder (+ text tokenizer). LoRA runs also keep the adapter under ``adapter/``
        and export the merged model."""
        from tokenizer.checkpoint import atomic_write_dir

        state = self.acc.get_state_dict(self.model)  # gathers ZeRO-3 shards
        model = self.acc.unwrap_model(self.model)
        if self.acc.is_main_process:
            def write(tmp: Path) -> None:
                if self.cfg.lora.enabled:
                    model.save_pretrained(tmp / "adapter", state_dict=state)
                    merged = merge_lora_state(model.base_model.model.config, state, self.cfg)
                    merged.save_pretrained(tmp)
                else:
                    model.save_pretrained(tmp, state_dict=state)
                self.processor.tokenizer.save_pretrained(tmp)

            atomic_write_dir(path, write)
            logger.info("exported %s", path)
        self.acc.wait_for_everyone()
        return path


def snapshots(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, model folder) of every snapshot a run exported (``train.snapshot_every``), in step order."""
    found = [(int(p.name.removeprefix("step_")), p) for p in (Path(output_dir) / "snapshots").glob("step_*")
             if p.name.removeprefix("step_").isdigit()]  # written atomically: a folder of that name is complete
    return sorted(found)


def merge_lora_state(config: UniTokMLLMConfig, state: dict[str, torch.Tensor], cfg: MLLMTrainConfig) -> UniTokMLLM:
    """A plain model from a full PEFT state dict (base weights + adapters), merged on CPU in float32. Every tensor
    of the model must come from ``state``: the model is freshly initialised, so a key lost to a peft rename would
    otherwise export random weights."""
    base = UniTokMLLM(config)
    peft_model = apply_lora(base, cfg)
    missing, unexpected = peft_model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: {len(missing)} missing {missing[:5]}, "
                         f"{len(unexpected)} unexpected {unexpected[:5]}")
    return peft_model.merge_and_unload()


def train(cfg: MLLMTrainConfig, resume: str | None = None, accelerator=None,
          overwrite: bool = False) -> list[dict[str, float]]:
    return MLLMTrainer(cfg, resume=resume, accelerator=accelerator, overwrite=overwrite).fit()


__all__ = ["MLLMTrainer", "train", "snapshots", "build_model", "build_accelerator", "apply_lora", "lora_config",
           "freeze", "merge_lora_state", "deepspeed_plugin"]
