"""Reading checkpoint files as they are: every tensor of a folder or file (sharded or not, safetensors or ``.bin``),
and the Llama fields of a foreign ``config.json``. Both the model (``UniTokMLLM.from_llama``) and the converter of
the released layout (``mllm.convert``) read through here."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from . import hf_compat as hf


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a folder (sharded or not, safetensors or ``.bin``) or one file.
    ``.bin``/``.pth`` files are read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index_name).is_file():
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
                state = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(read_state_dict(path / shard))
                return state
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path} holds no model.safetensors, pytorch_model.bin or a shard index")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return state


def llama_fields(config_path: str | Path) -> dict:
    """The Llama fields of a ``config.json`` (model_type llama, mini_gemini, ...), through ``LlamaConfig``."""
    raw = json.loads(Path(config_path).read_text())
    for k in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
        raw.pop(k, None)
    known = set(LlamaConfig().to_dict())
    llama = LlamaConfig(**{k: v for k, v in raw.items() if k in known or k in hf.LEGACY_ROPE_FIELDS})
    fields = llama.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "_name_or_path", "id2label", "label2id",
              "output_attentions"):
        fields.pop(k, None)
    return fields


__all__ = ["read_state_dict", "llama_fields"]
