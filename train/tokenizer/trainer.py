"""UniTok tokenizer training (the released recipe, notes/unitok_tokenizer_spec.md §10), on accelerate.

One step:

1. generator: ``L = l1*L1 + l2*L2 + lpips*LPIPS + vq*L_vq + entropy*L_ent + clip*L_clip + w_g*L_G`` where
   ``w_g = ramp * disc.weight * adaptive`` once the discriminator has started;
2. discriminator (from ``disc_start_step`` on): hinge loss on blurred + DiffAugmented real/reconstructed images, plus
   ``bcr`` x balanced consistency regularisation.

The pieces are small functions (:func:`build_model`, :func:`reconstruction_losses`, :class:`GANSchedule`,
:func:`discriminator_input`, ...) so a variant recipe can swap one without copying the loop.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from train.common.checkpoint import (FAULT_ENV, CheckpointManager, capture_rng_state, check_world_size,
                                     inject_fault, load_state, restore_rng_state, save_state)
from tokenizer.checkpoint import claim_output
from train.common.config import save_yaml
from train.common.contrastive import clip_loss
from train.common.images import make_grid, save_image_grid
from train.common.optim import build_adamw
from train.common.precision import log_precision, resolve_precision
from train.common.schedule import warmup_cosine_scheduler
from train.common.tracking import MetricsWriter, Throughput, progress_bar

from .config import DiscConfig, TokenizerTrainConfig
from .data import ImageTextStream, build_source, build_stream, describe
from .diffaug import diff_augment
from .discriminator import (adaptive_generator_weight, bcr_loss, blur_schedule, gaussian_blur, hinge_d_loss,
                            hinge_g_loss)

logger = logging.getLogger(__name__)
RUN_OUTPUTS = ("checkpoints", "model", "logs", "samples", "config.yaml", "wandb")  # written into train.output_dir

LOGIT_SCALE_MAX = math.log(100.0)


# ================================================================================================ building blocks
def build_model(cfg: TokenizerTrainConfig) -> nn.Module:
    """UniTok from a preset (+ overrides) or from ``model.pretrained``; the entropy weight comes from ``loss``."""
    from tokenizer import UniTok, UniTokConfig

    overrides = {**cfg.model.overrides, "entropy_weight": cfg.loss.entropy}
    if cfg.model.pretrained:
        model = UniTok.from_pretrained(cfg.model.pretrained, **overrides)
    else:
        model = UniTok(UniTokConfig.from_preset(cfg.model.preset, **overrides))
    model.set_grad_checkpointing(cfg.model.gradient_checkpointing)
    return model.train()


def build_lpips(cfg: TokenizerTrainConfig, image_size: int) -> nn.Module | None:
    if cfg.loss.lpips <= 0:
        return None
    if cfg.loss.lpips_path is None:
        logger.warning("LPIPS loss disabled: loss.lpips_path is not set (give lpips_with_vgg.pth, or "
                       "[vgg16.pth, lpips_vgg_heads.pth]); training with L1 + L2 reconstruction only")
        return None
    if image_size < cfg.loss.lpips_min_resolution:
        logger.warning("LPIPS loss disabled: image size %d < loss.lpips_min_resolution %d", image_size,
                       cfg.loss.lpips_min_resolution)
        return None
    from metrics.lpips import LPIPS

    return LPIPS.from_pretrained(cfg.loss.lpips_path)


def build_discriminator(cfg: TokenizerTrainConfig, image_size: int) -> nn.Module | None:
    if not cfg.disc.enabled or cfg.disc.weight <= 0:
        logger.info("adversarial loss disabled (disc.enabled=false or disc.weight=0)")
        return None
    from .discriminator import build_discriminator as build

    return build(cfg.disc.kind, image_size, dino_path=cfg.disc.dino_path)


class GANSchedule:
    """When the discriminator trains, how much its generator term weighs, and how much its inputs are blurred."""

    def __init__(self, start: int, warmup: int, image_size: int, blur: bool) -> None:
        self.start, self.warmup, self.image_size, self.blur = start, warmup, image_size, blur

    def active(self, step: int) -> bool:
        return step >= self.start

    def ramp(self, step: int) -> float:
        """Linear 0 -> 1 over ``warmup`` steps from ``start``: 0 on the first step, so the generator never follows
        an untrained discriminator."""
        if step < self.start:
            return 0.0
        return 1.0 if self.warmup <= 0 else min(1.0, (step - self.start) / self.warmup)

    def sigma(self, step: int) -> float:
        if not self.blur:
            return 0.0
        return blur_schedule(step, self.start, self.warmup, self.image_size)


def discriminator_input(x: torch.Tensor, sigma: float, cfg: DiscConfig) -> torch.Tensor:
    """Blur (fading out after the start) then DiffAugment, for real and reconstructed images alike."""
    if sigma > 0:
        x = gaussian_blur(x, sigma)
    if cfg.diffaug:
        x = diff_augment(x, p=1.0, cutout=cfg.cutout)
    return x


def reconstruction_losses(images: torch.Tensor, rec: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 and MSE on [-1, 1] images (the reference's ``vae_bs`` is the whole local batch), in fp32."""
    rec, images = rec.float(), images.float()
    return {"l1": (rec - images).abs().mean(), "l2": F.mse_loss(rec, images)}


def build_accelerator(cfg: TokenizerTrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    mp = log_precision(resolve_precision(cfg.train.mixed_precision), "tokenizer training")
    AcceleratorState._reset_state()  # a run of its own (see train.mllm.trainer.build_accelerator)
    return Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           # loss.clip = 0 leaves the text tower and the CLIP head without gradients
                           find_unused_parameters=cfg.train.find_unused_parameters or cfg.loss.clip <= 0)])


# ================================================================================================ trainer
@dataclass
class StepResult:
    step: int                 # 1-based number of completed steps
    metrics: dict[str, float]


class TokenizerTrainer:
    """Owns models, optimisers, schedules, data stream and checkpoints of one run.

    ``fit()`` runs to ``train.steps``; :meth:`train_step` is one generator (+ discriminator) update and can be
    driven by another loop. Checkpoints capture everything a continuation needs, so ``resume`` + ``fit`` produces
    the same losses as an uninterrupted run (tested on CPU).
    """

    def __init__(self, cfg: TokenizerTrainConfig, accelerator=None, resume: str | None = None,
                 overwrite: bool = False) -> None:
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        self.acc = accelerator if accelerator is not None else build_accelerator(cfg)
        self.is_fsdp = self.acc.distributed_type == DistributedType.FSDP
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_last,
                                      is_main=self.acc.is_main_process, barrier=self.acc.wait_for_everyone)
        if cfg.train.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        resume_dir = self.ckpt.resolve(resume) if resume else None
        if resume_dir is not None:
            check_world_size(resume_dir, self.acc.num_processes)
        else:  # a new run never mixes with (or silently replaces) an earlier one in the same folder
            claim_output(self.out_dir, overwrite, RUN_OUTPUTS, "continue it with --resume", self.acc.is_main_process)
            self.acc.wait_for_everyone()
        source = build_source(cfg.data)  # first: a bad data path should fail before minutes of model building

        # Models: same seed on every rank for the init (DDP also broadcasts rank 0's weights at wrap time).
        set_seed(cfg.train.seed)
        model = build_model(cfg)
        self.image_size = model.config.image_size
        disc = build_discriminator(cfg, self.image_size)
        self.lpips = build_lpips(cfg, self.image_size)
        if resume_dir is not None:  # weights before wrapping, so DDP/FSDP shard the restored values
            self._load_weights(resume_dir, model, disc)
        device = self.acc.device
        model.to(device)
        if disc is not None:
            disc.to(device)
        if self.lpips is not None:
            self.lpips.to(device)

        o = cfg.optim
        opt = build_adamw(model, o.lr, o.weight_decay, o.betas, o.eps)
        self.sched = warmup_cosine_scheduler(opt, cfg.train.steps, o.warmup_steps, o.min_lr_ratio)
        self.gan = GANSchedule(cfg.disc_start_step, cfg.disc_warmup_steps, self.image_size, cfg.disc.blur)
        if disc is not None:
            d = cfg.disc
            disc_opt = build_adamw(disc, d.lr, d.weight_decay, d.betas, d.eps)
            # Its own warmup from its first step (it only steps once started), then cosine to 0.1x at the end.
            self.disc_sched = warmup_cosine_scheduler(disc_opt, max(1, cfg.train.steps - cfg.disc_start_step),
                                                      max(0, min(cfg.disc_warmup_steps,
                                                                 cfg.train.steps - cfg.disc_start_step)),
                                                      o.min_lr_ratio)
            self.model, self.disc, self.opt, self.disc_opt = self.acc.prepare(model, disc, opt, disc_opt)
        else:
            self.model, self.opt = self.acc.prepare(model, opt)
            self.disc = self.disc_opt = self.disc_sched = None
        self.unwrapped = self.acc.unwrap_model(self.model)
        self.disc_unwrapped = self.acc.unwrap_model(self.disc) if self.disc is not None else None

        # Data: this rank's endless stream.
        if self.acc.is_main_process:
            logger.info("data: %s", describe(source))
        self.stream: ImageTextStream = build_stream(cfg.data, self.image_size, cfg.train.batch_size, cfg.train.seed,
                                                    rank=self.acc.process_index, world_size=self.acc.num_processes,
                                                    source=source)
        self.step = 0
        self.train_seconds = 0.0  # wall time in train steps (not evaluation or checkpoints), kept across resumes
        self.last_rec = torch.empty(0)
        self.history: list[dict[str, float]] = []
        if cfg.eval.every > 0 and self.is_fsdp:
            raise ValueError("eval.every > 0 is not supported under FSDP (it calls the unwrapped model); set 0")
        self.eval_images = self._eval_images() if cfg.eval.every > 0 else None
        # Per-rank randomness (DiffAug coins, drop-path) differs across ranks but is reproducible.
        set_seed(cfg.train.seed, device_specific=True)
        if resume_dir is not None:
            self._load_training_state(resume_dir)

        self.metrics = MetricsWriter(self.out_dir / "logs", enabled=self.acc.is_main_process,
                                     tensorboard=cfg.train.tensorboard)
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.out_dir / "config.yaml")
            n_params = sum(p.numel() for p in self.unwrapped.parameters())
            logger.info("UniTok %s: %.2f M parameters, %d px, %d processes x batch %d, %d steps%s",
                        cfg.model.preset if not cfg.model.pretrained else cfg.model.pretrained, n_params / 1e6,
                        self.image_size, self.acc.num_processes, cfg.train.batch_size, cfg.train.steps,
                        f", resumed at step {self.step} from {resume_dir}" if resume_dir else "")
            if self.disc is not None:
                logger.info("discriminator %s starts at step %d (ramp over %d steps)", cfg.disc.kind,
                            self.gan.start, self.gan.warmup)

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, Any]) -> StepResult:
        cfg, w, step = self.cfg, self.cfg.loss, self.step
        images = batch["images"].to(self.acc.device, non_blocking=True)
        # loss.clip = 0 (e.g. a reconstruction-only demo): the text tower is not run at all.
        text = self.unwrapped.tokenize_text(batch["texts"]).to(self.acc.device) if w.clip > 0 else None
        m: dict[str, float] = {}

        # ---- generator
        self.model.train()
        gan_on = self.disc is not None and self.gan.active(step)
        ramp = self.gan.ramp(step) if self.disc is not None else 0.0
        sigma = self.gan.sigma(step) if gan_on else 0.0
        with self.acc.autocast():
            out = self.model(images, text)
            rec = reconstruction_losses(images, out.rec)
            nll = w.l1 * rec["l1"] + w.l2 * rec["l2"]
            if self.lpips is not None:
                lp = self.lpips(images.float(), out.rec.float(), reduction="mean")
                nll = nll + w.lpips * lp
                m["lpips"] = lp.item()
            clip = (clip_loss(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
                    if text is not None else images.new_zeros((), dtype=torch.float32))
            loss = nll + w.vq * out.vq_loss + w.entropy * out.entropy_loss + w.clip * clip
            if gan_on and ramp > 0:
                # The unwrapped discriminator with frozen parameters: gradients reach the reconstruction only,
                # and DDP's reducer of the discriminator is not involved in the generator's backward.
                self.disc_unwrapped.requires_grad_(False)
                logits_fake = self.disc_unwrapped(discriminator_input(out.rec, sigma, cfg.disc),
                                                  grad_ckpt=cfg.model.gradient_checkpointing)
                g_loss = hinge_g_loss(logits_fake.float())
                ada = (adaptive_generator_weight(nll, g_loss, self.unwrapped.decoder.last_layer)
                       if cfg.disc.adaptive else torch.ones((), device=images.device))
                w_g = ramp * cfg.disc.weight * ada
                loss = loss + w_g * g_loss
                m.update(g_loss=g_loss.item(), w_g=float(w_g), w_adaptive=float(ada))
        self.last_rec = out.rec.detach()[:cfg.train.grid_images]  # for the reconstruction grid
        self.acc.backward(loss)
        m["grad_norm"] = self._clip(self.model, cfg.optim.grad_clip)
        m["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # open_clip: keep exp(logit_scale) in [1, 100]
            self.unwrapped.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

        # ---- discriminator
        if gan_on:
            m.update(self._disc_step(images, out.rec.detach(), sigma))

        m.update(loss=loss.item(), nll=nll.item(), l1=rec["l1"].item(), l2=rec["l2"].item(), vq=out.vq_loss.item(),
                 entropy=out.entropy_loss.item(), clip=clip.item(), usage=float(out.usage),
                 logit_scale=out.logit_scale.detach().item(), ramp=ramp, blur_sigma=sigma)
        self.step += 1
        return StepResult(self.step, m)

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor, sigma: float) -> dict[str, float]:
        cfg = self.cfg.disc
        self.disc_unwrapped.requires_grad_(True)
        self.disc.train()
        with self.acc.autocast():
            # Blur once; each discriminator call below draws its own DiffAugment.
            real_b = gaussian_blur(real, sigma) if sigma > 0 else real
            fake_b = gaussian_blur(fake, sigma) if sigma > 0 else fake
            ckpt = self.cfg.model.gradient_checkpointing
            logits_real = self.disc(discriminator_input(real_b, 0.0, cfg), grad_ckpt=ckpt).float()
            logits_fake = self.disc(discriminator_input(fake_b, 0.0, cfg), grad_ckpt=ckpt).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            m = {"d_hinge": d_loss.item()}
            if cfg.bcr > 0:
                bcr = bcr_loss(self.disc, real_b, fake_b, logits_real, logits_fake, cutout=cfg.cutout)
                d_loss = d_loss + cfg.bcr * bcr
                m["d_bcr"] = bcr.item()
        self.acc.backward(d_loss)
        m["d_grad_norm"] = self._clip(self.disc, cfg.grad_clip)
        m["d_lr"] = self.disc_opt.param_groups[0]["lr"]
        self.disc_opt.step()
        self.disc_sched.step()
        self.disc_opt.zero_grad(set_to_none=True)
        m.update(d_loss=d_loss.item(), logits_real=logits_real.mean().item(), logits_fake=logits_fake.mean().item())
        return m

    # ------------------------------------------------------------------------------------------------ evaluation
    def _eval_images(self) -> torch.Tensor:
        """Held-out shapes-world test scenes, rendered exactly at the model's image size, in [-1, 1]."""
        from shapes.world import generate_split, render

        from .data import to_tensor

        e = self.cfg.eval
        scenes = generate_split("test", e.shapes_test, seed=e.seed)
        return torch.stack([to_tensor(render(sc, self.image_size)) for sc in scenes])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reconstruction through the codes (eval mode, clamped to [-1, 1]) of the held-out images: PSNR in dB on
        [0, 1] pixels (mean of per-image PSNR), L1 and MSE on [-1, 1]. Every rank computes the same numbers."""
        if self.eval_images is None:
            raise RuntimeError("evaluate() needs eval.every > 0")
        model = self.unwrapped  # encode/decode, not forward: no codebook-usage EMA update from held-out images
        model.eval()
        psnr, l1, l2 = [], [], []
        for chunk in self.eval_images.split(self.cfg.eval.batch_size):
            x = chunk.to(self.acc.device)
            with self.acc.autocast():
                rec = model.decode(model.encode(x)).float().clamp(-1, 1)
            mse01 = ((rec - x) / 2).pow(2).flatten(1).mean(1)
            psnr.append(10 * torch.log10(1.0 / mse01.clamp_min(1e-10)))
            l1.append((rec - x).abs().flatten(1).mean(1))
            l2.append((rec - x).pow(2).flatten(1).mean(1))
        model.train()
        return {"psnr": torch.cat(psnr).mean().item(), "l1": torch.cat(l1).mean().item(),
                "l2": torch.cat(l2).mean().item(), "train_time_s": self.train_seconds}

    def _clip(self, model: nn.Module, max_norm: float) -> float:
        if max_norm > 0:
            return float(self.acc.clip_grad_norm_(model.parameters(), max_norm))
        grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg.train
        main = self.acc.is_main_process
        bar = progress_bar(cfg.steps, initial=self.step, enabled=main, desc="tokenizer")
        speed = Throughput()
        batches: Iterator[dict[str, Any]] = iter(self.stream)
        every = self.cfg.eval.every
        try:
            if every and self.step == 0:
                self._log_eval(bar, speed)
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batch = next(batches)
                result = self.train_step(batch)
                self.train_seconds += time.perf_counter() - t0
                m, step = result.metrics, result.step
                n_images = batch["images"].shape[0] * self.acc.num_processes
                speed.update(n_images)
                self.history.append({"step": step, **m})
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                    rate = speed.rate()
                    m = {**m, "images_per_s": rate, "bad_records": float(self.stream.stats.bad)}
                    bar.set_postfix(loss=f"{m['loss']:.4f}", rec=f"{m['l2']:.4f}", img_s=f"{rate:.1f}")
                    self.metrics.scalars(step, m, prefix="train/")
                if main and cfg.grid_images and (step % cfg.grid_every == 0 or step == cfg.steps):
                    self._save_grid(step, batch["images"], self.last_rec)
                if every and (step % every == 0 or step == cfg.steps):
                    self._log_eval(bar, speed)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                    speed.exclude(time.perf_counter() - t0)
                if os.environ.get(FAULT_ENV):  # flush first: the kill skips the finally below
                    self.metrics.flush()
                    inject_fault(step)
        finally:
            bar.close()
            self.metrics.flush()
        if self.stream.stats.bad and main:
            logger.warning("data: %s", self.stream.stats.summary())
        self.export(self.out_dir / "model")
        self.metrics.close()
        return self.history

    def _log_eval(self, bar, speed: Throughput) -> None:
        t0 = time.perf_counter()
        e = self.evaluate()
        self.metrics.scalars(self.step, e, prefix="eval/")
        if self.acc.is_main_process:
            logger.info("step %d: held-out PSNR %.2f dB (L2 %.4f) after %.1f s of training", self.step, e["psnr"],
                        e["l2"], e["train_time_s"])
        speed.exclude(time.perf_counter() - t0)  # images/s counts training only

    def _save_grid(self, step: int, images: torch.Tensor, rec: torch.Tensor) -> None:
        n = min(self.cfg.train.grid_images, images.shape[0], rec.shape[0])
        grid = torch.cat([images[:n].cpu(), rec[:n].float().cpu()])  # row 1: inputs, row 2: reconstructions
        path = save_image_grid(grid, self.out_dir / "samples" / f"step-{step:08d}.png", nrow=n)
        self.metrics.image("reconstructions", make_grid(grid, nrow=n), step)
        logger.debug("wrote %s", path)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        state = self._full_state_dict(self.model)  # collective under FSDP: every rank calls it
        disc_state = self._full_state_dict(self.disc) if self.disc is not None else None

        def write(tmp: Path) -> None:
            rank = self.acc.process_index
            if self.acc.is_main_process:
                self._write_model(tmp / "model", state)
                if disc_state is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in disc_state.items()}, str(tmp / "discriminator.safetensors"))
                save_yaml(self.cfg, tmp / "train_config.yaml")
            # Optimiser states: plain torch.save on rank 0 for DDP; accelerate's FSDP helpers shard-aware.
            if self.is_fsdp:
                from accelerate.utils.fsdp_utils import save_fsdp_optimizer

                plugin = self.acc.state.fsdp_plugin
                save_fsdp_optimizer(plugin, self.acc, self.opt, self.model, str(tmp / "fsdp_optim"), 0)
                if self.disc is not None:
                    save_fsdp_optimizer(plugin, self.acc, self.disc_opt, self.disc, str(tmp / "fsdp_optim"), 1)
            if self.acc.is_main_process:
                save_state({
                    "step": self.step,
                    "train_seconds": self.train_seconds,
                    "optimizer": None if self.is_fsdp else self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "disc_optimizer": None if self.is_fsdp or self.disc is None else self.disc_opt.state_dict(),
                    "disc_scheduler": None if self.disc_sched is None else self.disc_sched.state_dict(),
                }, tmp / "trainer_state.pt")
            save_state({"rng": capture_rng_state(), "data": self.stream.state_dict()}, tmp / f"rank{rank:05d}.pt")

        path = self.ckpt.save(self.step, write, meta={"world_size": self.acc.num_processes,
                                                      "images_seen": self.step * self.cfg.train.batch_size
                                                      * self.acc.num_processes})
        if self.acc.is_main_process:
            logger.info("saved checkpoint %s", path)
        return path

    def _full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.is_fsdp:
            state = self.acc.get_state_dict(model)
        else:
            state = self.acc.unwrap_model(model).state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if self.acc.is_main_process else {}

    def _write_model(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """``save_pretrained`` layout (config.json + model.safetensors) from a full state dict (FSDP gathers it)."""
        if not self.is_fsdp:
            self.unwrapped.save_pretrained(path)
            return
        from safetensors.torch import save_file

        from tokenizer.model import CONFIG_NAME, WEIGHTS_NAME

        path.mkdir(parents=True, exist_ok=True)
        self.unwrapped.config.save(path / CONFIG_NAME)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_NAME),
                  metadata={"format": "pt", "model": "unitok"})

    def export(self, path: Path) -> None:
        """Final weights as a plain ``save_pretrained`` folder (what ``unitok encode`` and the MLLM load)."""
        state = self._full_state_dict(self.model)
        if self.acc.is_main_process:
            self._write_model(Path(path), state)
            logger.info("exported the tokenizer to %s", path)
        self.acc.wait_for_everyone()

    def _load_weights(self, path: Path, model: nn.Module, disc: nn.Module | None) -> None:
        from safetensors.torch import load_file

        from tokenizer.model import WEIGHTS_NAME

        model.load_official_state_dict(load_file(str(path / "model" / WEIGHTS_NAME)), source=str(path / "model"))
        if disc is not None:
            disc_file = path / "discriminator.safetensors"
            if not disc_file.is_file():
                raise FileNotFoundError(f"{path} has no discriminator.safetensors but this run trains one")
            disc.load_state_dict(load_file(str(disc_file)))

    def _load_training_state(self, path: Path) -> None:
        check_world_size(path, self.acc.num_processes)
        state = load_state(path / "trainer_state.pt")
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.step >= self.cfg.train.steps:
            logger.warning("checkpoint step %d >= train.steps %d: nothing left to train", self.step,
                           self.cfg.train.steps)
        if self.is_fsdp:
            from accelerate.utils.fsdp_utils import load_fsdp_optimizer

            plugin = self.acc.state.fsdp_plugin
            load_fsdp_optimizer(plugin, self.acc, self.opt, self.model, str(path / "fsdp_optim"), 0)
            if self.disc is not None:
                load_fsdp_optimizer(plugin, self.acc, self.disc_opt, self.disc, str(path / "fsdp_optim"), 1)
        else:
            self.opt.load_state_dict(state["optimizer"])
            if self.disc is not None:
                self.disc_opt.load_state_dict(state["disc_optimizer"])
        _load_schedule(self.sched, state["scheduler"], "generator")
        if self.disc_sched is not None:
            _load_schedule(self.disc_sched, state["disc_scheduler"], "discriminator")
        rank_state = load_state(path / f"rank{self.acc.process_index:05d}.pt")
        self.stream.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])


def _load_schedule(sched: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any], what: str) -> None:
    """Restore the step counter; the schedule's shape (total steps, warmup) follows *this* run's config, so a run
    resumed with a larger ``train.steps`` really trains longer (``LambdaLR.load_state_dict`` alone would bring back
    the checkpoint's schedule objects)."""
    current = [dict(vars(f)) for f in sched.lr_lambdas]
    sched.load_state_dict(state)
    for f, settings in zip(sched.lr_lambdas, current):
        if vars(f) != settings:
            logger.warning("%s LR schedule changed on resume: %s -> %s (continuing with the new one)", what,
                           {k: v for k, v in vars(f).items() if settings.get(k) != v},
                           {k: v for k, v in settings.items() if vars(f).get(k) != v})
            vars(f).update(settings)
            for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)


def train(cfg: TokenizerTrainConfig, resume: str | None = None, accelerator=None,
          overwrite: bool = False) -> list[dict[str, float]]:
    t0 = time.perf_counter()
    trainer = TokenizerTrainer(cfg, accelerator=accelerator, resume=resume, overwrite=overwrite)
    history = trainer.fit()
    if trainer.acc.is_main_process:
        logger.info("done: %d steps in %.1f s; outputs in %s", trainer.step, time.perf_counter() - t0, cfg.train.output_dir)
    return history


__all__ = ["TokenizerTrainer", "train", "build_model", "build_lpips", "build_discriminator", "GANSchedule",
           "discriminator_input", "reconstruction_losses", "build_accelerator"]
