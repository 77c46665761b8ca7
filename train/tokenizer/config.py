"""Typed configuration of a tokenizer training run (``configs/tokenizer/*.yaml``).

Defaults are the released UniTok recipe (notes/unitok_tokenizer_spec.md §10); a YAML file only lists what differs.
Unknown keys and wrong types are rejected by :func:`train.common.config.from_dict` with the dotted key in the message.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from train.common.config import ConfigError, LoopSection, OptimSection, load_config


@dataclass
class ModelConfig:
    preset: str = "unitok-large"                               # UniTokConfig.from_preset name
    overrides: dict[str, Any] = field(default_factory=dict)   # UniTokConfig fields on top of the preset
    pretrained: str | None = None                              # a save_pretrained dir to start from (fine-tuning)
    gradient_checkpointing: bool = True
    RENAMED: ClassVar[dict[str, str]] = {"init_from": "pretrained", "grad_checkpointing": "gradient_checkpointing"}

    def __post_init__(self) -> None:
        if "entropy_weight" in self.overrides:
            raise ValueError("model.overrides.entropy_weight: set the entropy weight with loss.entropy instead "
                             "(the trainer passes it to the model, which computes the loss only when it is > 0)")


@dataclass
class DataConfig:
    # Files, directories or globs; `{000..139}` ranges are expanded (webdataset shard notation).
    paths: list[str] = field(default_factory=list)
    format: Literal["auto", "folder", "jsonl", "parquet", "webdataset", "shapes"] = "auto"
    image_key: str | None = None   # column/field holding the image (auto: image, jpg, png, webp, ...)
    text_key: str | None = None    # column/field holding the caption (auto: text, caption, txt)
    image_root: str | None = None  # base dir for relative image paths (default: the directory of each file)
    streaming: bool = False        # iterate with datasets' streaming mode instead of building an Arrow cache
    shuffle: bool = True
    shuffle_buffer: int = 10_000   # streaming only: reservoir size of the approximate shuffle
    num_workers: int = 8
    cache_dir: str | None = None   # datasets' Arrow cache (default: HF_DATASETS_CACHE)
    # Training transform as released (open_clip image_transform is_train): RandomResizedCrop, bicubic, no flip.
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Unreadable records are skipped and counted; more than this fraction (after `bad_check_min_records` records
    # were read) stops training: that many failures means a broken dataset, not a few corrupt files.
    max_bad_fraction: float = 0.01
    bad_check_min_records: int = 1000
    log_bad_records: int = 20      # log each of the first N skipped records individually
    # format "shapes" (no paths): scenes of the shapes world (shapes/world.py) rendered on the fly. Record i of
    # the virtual dataset is a pure function of (shapes_seed, shapes_split, i); only layouts that hash to the split
    # are drawn, so a "train" run never sees a test layout. Captions are the world's captions (one per visit).
    shapes_split: Literal["train", "validation", "test"] = "train"
    shapes_scenes: int = 1_000_000  # records per epoch
    shapes_seed: int = 0

    def __post_init__(self) -> None:
        if self.shapes_scenes <= 0:
            raise ValueError(f"data.shapes_scenes must be > 0, got {self.shapes_scenes}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class LossConfig:
    # L = l1*L1 + l2*L2 + lpips*LPIPS + vq*L_vq + entropy*L_entropy + w_g*L_G + clip*L_clip   (spec §10)
    l1: float = 0.2
    l2: float = 1.0
    lpips: float = 1.0
    vq: float = 1.0
    entropy: float = 0.0            # `le`; 0 = the model skips the entropy term (released default)
    clip: float = 1.0
    # LPIPS weights: one file, or [vgg16_backbone, linear_heads]. None disables LPIPS (logged at start-up).
    lpips_path: str | list[str] | None = None
    lpips_min_resolution: int = 48  # `lpr`: below this image size LPIPS is skipped (VGG features degenerate)


@dataclass
class DiscConfig:
    enabled: bool = True
    kind: str = "dino"              # train.tokenizer.discriminator.build_discriminator kind
    dino_path: str | None = None    # frozen DINOv2 ViT-S/14 weights for kind "dino"
    weight: float = 0.4             # `ld`; w_g = ramp * weight * adaptive weight
    adaptive: bool = True           # scale by |grad nll| / |grad L_G| at decoder.last_layer (`gada`)
    start_fraction: float = 0.375   # the discriminator starts at this fraction of train.steps
    start_step: int | None = None   # or at this absolute step (overrides start_fraction)
    warmup_fraction: float = 0.03   # linear ramp of w_g (and the blur schedule) over this fraction of train.steps
    blur: bool = True               # blur every discriminator input, sigma sqrt(H/2) -> 0 over 2x the warmup
    diffaug: bool = True            # DiffAugment (translation, colour, cutout) on every discriminator input
    cutout: float = 0.2
    bcr: float = 4.0                # balanced consistency regularisation weight (0 disables)
    lr: float = 2e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_fraction <= 1.0 or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("disc.start_fraction and disc.warmup_fraction must be in [0, 1]")
        if self.start_step is not None and self.start_step < 0:
            raise ValueError(f"disc.start_step must be >= 0, got {self.start_step}")


@dataclass
class OptimConfig(OptimSection):
    """The released recipe's optimiser."""
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.02
    grad_clip: float = 10.0
    warmup_steps: int = 781         # 1 % of the 78,125 steps
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig(LoopSection):
    steps: int = 78_125             # 1.28e9 samples (DataComp, one epoch) / 16,384 global batch
    output_dir: str = "runs/unitok-tokenizer"
    log_every: int = 20
    save_every: int = 2_000
    batch_size: int = 64            # per process (`local_bs`)
    tf32: bool = True
    grid_every: int = 1_000
    grid_images: int = 8
    find_unused_parameters: bool = False  # DDP: only needed when a loss term skips part of the model

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "grid_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.grid_images < 0:
            raise ValueError(f"train.grid_images must be >= 0, got {self.grid_images}")


@dataclass
class EvalConfig:
    """Reconstruction quality on held-out images during training (logged as ``eval/psnr``, ``eval/l1``, ``eval/l2``
    with the training wall time ``eval/train_time_s``, excluding evaluation and checkpointing)."""
    every: int = 0                  # steps between evaluations (0 = off); also at step 0 and at the end
    shapes_test: int = 64           # held-out images: this many scenes of the shapes world's *test* split
    seed: int = 0                   # world.generate_split("test", shapes_test, seed)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0 or self.shapes_test <= 0 or self.batch_size <= 0:
            raise ValueError("eval.every must be >= 0, eval.shapes_test and eval.batch_size > 0")


@dataclass
class TokenizerTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # The discriminator's schedule is in fractions of train.steps, so a recipe's GAN phase scales with it.
    @property
    def disc_start_step(self) -> int:
        if self.disc.start_step is not None:
            return self.disc.start_step
        return int(round(self.disc.start_fraction * self.train.steps))

    @property
    def disc_warmup_steps(self) -> int:
        return int(round(self.disc.warmup_fraction * self.train.steps))

    @staticmethod
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """``optim.warmup_fraction`` (before the trainers shared one optimiser section) is read for one release as
        ``optim.warmup_steps`` = round(fraction x train.steps), with a one-line deprecation warning."""
        optim = data.get("optim")
        if isinstance(optim, dict) and "warmup_fraction" in optim:
            if "warmup_steps" in optim:
                raise ConfigError("config keys 'optim.warmup_fraction' and 'optim.warmup_steps' are one setting: "
                                  "give only 'optim.warmup_steps'")
            train = data.get("train") if isinstance(data.get("train"), dict) else {}
            steps = train.get("steps", TrainConfig.steps)
            fraction = optim["warmup_fraction"]
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not isinstance(steps, int):
                raise ConfigError(f"config key 'optim.warmup_fraction' expects a number, got {fraction!r}")
            warnings.warn("config key 'optim.warmup_fraction' is deprecated and will be removed in the next release: "
                          f"use 'optim.warmup_steps' (here {int(round(fraction * steps))})", FutureWarning, stacklevel=3)
            rest = {k: v for k, v in optim.items() if k != "warmup_fraction"}
            data = {**data, "optim": {**rest, "warmup_steps": int(round(fraction * steps))}}
        return data

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TokenizerTrainConfig":
        return load_config(cls, path, overrides)
