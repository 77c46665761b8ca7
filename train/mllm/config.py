"""Typed MLLM training recipe (``unitok train --config configs/recipes/<name>.yaml``).

Sections: ``model`` (where the weights come from, what is frozen), ``data`` (:class:`train.data.config.MLLMDataConfig`),
``lora``, ``optim``, ``train`` (loop, checkpoints, launch). Stages are recipes, e.g.

* projector alignment: ``model.freeze: ["model.", "lm_head."]`` (backbone frozen; code embedder and depth head train);
* pretraining on a mixture: nothing frozen, ``data.sources`` mixes captions both ways and text;
* instruction tuning: ``model.pretrained`` = the pretraining export, chat data, optionally ``lora.enabled``.

Every key can be overridden on the command line as ``section.key=value`` (YAML value).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from train.common.config import LoopSection, OptimSection, load_config
from train.data.config import MLLMDataConfig

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    # exactly one of: a preset (random init), our save_pretrained folder, or a Llama-architecture checkpoint folder
    preset: str | None = None
    pretrained: str | None = None
    llama: str | None = None
    tokenizer: str | None = None  # UniTok: initialises the code embedder; encodes raw images of the data
    text_tokenizer: str | None = None  # folder for AutoTokenizer (default: pretrained / llama folder)
    overrides: dict[str, Any] = field(default_factory=dict)  # UniTokMLLMConfig fields (preset / llama init)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen

    def __post_init__(self) -> None:
        given = [k for k in ("preset", "pretrained", "llama") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of model.preset / model.pretrained / model.llama (got {given or 'none'})")
        from mllm.configuration import check_field_names

        check_field_names(self.overrides, "model.overrides")


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))  # in the backbone only
    full_modules: list[str] = field(default_factory=lambda: ["code_embedder", "depth_head"])  # trained fully


@dataclass
class OptimConfig(OptimSection):
    """LLaVA-style fine-tuning defaults (the shared section's)."""
    lr: float = 2e-5  # grad_clip 1.0 is written explicitly into DeepSpeed configs, whose default is also 1.0


@dataclass
class LoopConfig(LoopSection):
    output_dir: str = "runs/mllm"
    grad_accum: int = 1
    # export the model alone (our save_pretrained folder) every N steps under output_dir/snapshots/step_<N>, for
    # learning curves: weights only, so a few MB each for the demo's model; 0: off
    snapshot_every: int = 0
    deepspeed: str | None = None  # a configs/deepspeed/*.json; "auto" fields are filled from this recipe
    wandb: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.snapshot_every < 0:
            raise ValueError(f"train.snapshot_every must be >= 0 (0: off), got {self.snapshot_every}")


@dataclass
class MLLMTrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "MLLMTrainConfig":
        return load_config(cls, path, overrides)
