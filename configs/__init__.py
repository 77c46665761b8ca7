"""The project's configs as package data (installed with the wheel): tokenizer configs (``tokenizer/``), MLLM
training recipes (``recipes/``) and DeepSpeed JSON (``deepspeed/``).

A config path the user gives is read as it is; a relative ``configs/...`` path that does not exist from the working
directory is looked up here, so ``unitok train --config configs/recipes/demo-pretrain.yaml`` works from any folder
after ``pip install``."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """A file of the packaged configs: ``path("recipes", "demo-pretrain.yaml")``."""
    return ROOT.joinpath(*parts)


def resolve(given: str | Path) -> Path:
    """``given`` if it exists (or is absolute); else, for ``configs/<rest>``, the packaged ``<rest>``."""
    given = Path(given)
    if given.exists() or given.is_absolute() or not given.parts or given.parts[0] != "configs":
        return given
    packaged = ROOT.joinpath(*given.parts[1:])
    return packaged if packaged.exists() else given


__all__ = ["ROOT", "path", "resolve"]
