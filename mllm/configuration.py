"""Configuration of the unified UniTok MLLM: a Llama config plus the image-side sizes.

The backbone is any Llama-architecture decoder, so the config *is* a :class:`~transformers.LlamaConfig` (GQA, rope θ,
RMS eps, tied or untied head all come from it) extended with the fields that describe images:

* ``num_codebooks`` (K) sub-codebooks of ``codebook_size`` entries, each entry ``code_dim`` wide — the UniTok
  tokenizer's quantiser, read by the code embedder (its K·code_dim concatenation is the projection input);
* ``projection_dim`` / ``projection_heads``: the causal attention projection of the code embedder;
* ``depth_layers``: Llama layers of the depth head that emits the K sub-codes of one image position;
* ``image_positions`` (N): positions per image (16×16 = 256 for the released tokenizer at 256 px);
* ``image_position_embedding``: add a learned embedding per image position (its 2-D cell, initialised at the text
  embeddings' scale) to the code embedder's output. Off in the release, whose image embeddings carry position only
  through the backbone's 1-D RoPE index; on for tokenizers whose codes are translation-invariant (the demo's shapes
  world). Other position tables and an image-embedding scale were tried for the demo and lost (docs/demo.md);
* token ids: ``image_placeholder_id`` marks an image position in ``input_ids`` (and, in ``labels``, an image position whose
  codes are a training target), ``boi_token_id``/``eoi_token_id`` frame an image.

The released UniTok-MLLM hard-codes all image-side numbers in Python; here they are config fields whose defaults are
the released values, and ``PRESETS`` names the configurations the project uses.
"""
from __future__ import annotations

from transformers import LlamaConfig

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # the reference's placeholder id; never embedded as text


class UniTokMLLMConfig(LlamaConfig):
    model_type = "unitok_mllm"

    num_codebooks: int = 8
    codebook_size: int = 4096
    code_dim: int = 8
    projection_dim: int = 1024
    projection_heads: int = 16
    depth_layers: int = 3
    image_positions: int = 256
    image_position_embedding: bool = False
    image_placeholder_id: int = IMAGE_TOKEN_INDEX
    boi_token_id: int = 3
    eoi_token_id: int = 4
    z_loss_weight: float = 5e-5
    chat_template: str = "unitok"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projection_dim % self.projection_heads:
            raise ValueError(f"projection width {self.projection_dim} is not divisible by "
                             f"{self.projection_heads} heads")
        if self.projection_dim % (self.num_codebooks * self.code_dim):
            raise ValueError(f"projection_dim {self.projection_dim} must be a multiple of the code width "
                             f"{self.num_codebooks}x{self.code_dim}")
        if not isinstance(self.image_position_embedding, bool):
            raise ValueError(f"image_position_embedding must be true or false, got {self.image_position_embedding!r}")
        for name in ("num_codebooks", "codebook_size", "code_dim", "depth_layers", "image_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def code_width(self) -> int:
        """Width of one image position's concatenated sub-code vectors (K · code_dim, 64 in the release)."""
        return self.num_codebooks * self.code_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UniTokMLLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown MLLM preset {name!r}; choose from {', '.join(PRESETS)}")
        check_field_names(overrides, f"overrides of preset {name!r}")
        return cls(**{**PRESETS[name], **overrides})


def check_field_names(names, where: str = "config") -> None:
    """Raise naming the first name that is not a :class:`UniTokMLLMConfig` field, with the nearest valid one: a
    typo (``num_codebook``) would otherwise become a stray attribute while the real field keeps its default."""
    import dataclasses
    import difflib

    from .hf_compat import LEGACY_ROPE_FIELDS

    known = {f.name for f in dataclasses.fields(UniTokMLLMConfig)} | set(LEGACY_ROPE_FIELDS)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{where}: {name!r} is not a UniTokMLLMConfig field{hint}")


def image_side_from_tokenizer(tokenizer_config) -> dict:
    """The image-side config fields that make the MLLM read a given UniTok tokenizer's codes (and lets its
    ``post_quant_proj`` initialise the code embedder's projection)."""
    t = tokenizer_config
    return dict(num_codebooks=t.num_codebooks, codebook_size=t.codebook_size,
                code_dim=t.latent_dim // t.num_codebooks, projection_dim=t.width,
                projection_heads=t.attn_projection_heads, image_positions=t.num_positions)


# Named configurations. Image sides match a tokenizer preset (tokenizer/config.py): `tiny` -> tokenizer `tiny`
# (K=8 x 256 entries, latent 64, 4x4 positions), the others -> `unitok-large` (K=8 x 4096, latent 64, 16x16).
PRESETS: dict[str, dict] = {
    # the released UniTok-MLLM: Llama-2-7B + the released image side (spec §f)
    "unitok-mllm-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, chat_template="vicuna_v1"),
    # timing config of fixtures/mllm_ref/timing_medium.json
    "medium": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        projection_dim=256, projection_heads=4, image_positions=64, pad_token_id=0),
    # the CPU demo / test model, matching the `tiny` tokenizer
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        codebook_size=256, projection_dim=128, projection_heads=2, depth_layers=2, image_positions=16,
        pad_token_id=0),
}
