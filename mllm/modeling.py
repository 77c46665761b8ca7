"""The unified UniTok MLLM: a Llama decoder that reads and writes images as UniTok multi-codebook codes.

    text ids ──embed_tokens──┐
                             ├─ spliced at image positions ─► Llama backbone ─► final norm ─┬─► lm_head (text)
    image codes ─CodeEmbedder┘                                                              └─► DepthHead (K sub-codes)

* :class:`CodeEmbedder` — frozen lookup in the tokenizer's l2-normalised sub-codebooks (books concatenated in order),
  a **causal** attention projection over one image's positions, then an MLP projector to the hidden size.
* :class:`DepthHead` — for image position j, the sequence ``[h_{j-1}, E_0(c_j^0), …, E_{K-2}(c_j^{K-2})]`` (h: the
  backbone's final-normed state before position j) runs through a few Llama layers; slot k predicts sub-code k.
* One next-token loss: every supervised item — a text target token or an image sub-code (CE + its z-loss) — weighs
  the same, so the loss is ``(Σ text CE + Σ sub-code CE + Σ z) / items``: on its own batch exactly the reference's
  count-weighted mean of the text and image losses (spec §c). Given ``num_items_in_batch`` (the items of the whole
  optimiser step per micro-batch, as transformers' Trainer passes it) the sum is divided by that instead, so that a
  global batch gives the same gradient however it is split into micro-batches, accumulation steps and ranks. The LM
  head runs on text targets only and the depth head on supervised image positions only; in training a part with no
  targets in this micro-batch still runs once with weight 0, so every rank runs every trainable submodule on every
  step (ZeRO-3 gathers parameters per submodule: ranks that skip different ones would deadlock).

Sequence conventions (also see :mod:`mllm.processing`): every image occupies ``image_positions`` consecutive slots of
``input_ids`` equal to ``config.image_placeholder_id``; ``image_codes`` ``[M, K, N]`` lists the images in order of
appearance. In ``labels`` an image slot holds ``image_placeholder_id`` when its codes are a target (text-to-image) and
``IGNORE_INDEX`` otherwise. Packed rows (several samples per row) are expressed with ``position_ids`` restarting at
0 per sample; transformers then builds a block-diagonal causal mask (sdpa/eager), and flash-attention takes the
sequences from the collator's ``cu_seq_lens_*`` / ``max_length_*`` (passed through ``**kwargs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from . import hf_compat as hf
from .hf_compat import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm, LlamaRotaryEmbedding

from tokenizer.projection import AttnProjection, PlainAttention, ProjectionCache, StaticProjectionCache
from tokenizer.quantizer import MultiCodebookQuantizer, SubCodebook

from .configuration import IGNORE_INDEX, UniTokMLLMConfig
from .weights import llama_fields, read_state_dict


class CodeEmbedder(nn.Module):
    """Image codes ``[M, K, N]`` -> embeddings ``[M, N, hidden]`` (reference ``TokenEmbedder``, spec §a)."""

    def __init__(self, config: UniTokMLLMConfig):
        super().__init__()
        self.quantizer = MultiCodebookQuantizer(config.num_codebooks, config.codebook_size, config.code_width)
        self.quantizer.requires_grad_(False)  # an embedding table shared with the tokenizer: always frozen
        self.attn_projection = AttnProjection(config.code_width, config.projection_dim, config.projection_heads,
                                              causal=True)
        self.mm_projector = nn.Sequential(nn.LayerNorm(config.projection_dim, eps=1e-6),
                                          nn.Linear(config.projection_dim, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        # optional (config.image_position_embedding): which of the N positions an embedding belongs to
        self.position_embedding = (nn.Embedding(config.image_positions, config.hidden_size)
                                   if config.image_position_embedding else None)

    def lookup(self, codes: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Codes ``[M, K, N]`` -> ``[M, N, K·code_dim]``: each book's rows l2-normalised, books concatenated in order
        (the quantiser's ``idx_to_f``, through the embedding modules so that ZeRO-3 gathers their weights).
        ``check=False`` skips the range check (a host sync): for codes the model drew itself."""
        if check:
            self.quantizer.check_codes(codes)
        books = self.quantizer.codebooks
        return torch.cat([F.normalize(book.codebook(codes[:, i].long()).float(), dim=-1)
                          for i, book in enumerate(books)], dim=-1)

    def forward(self, codes: torch.Tensor, cache: ProjectionCache | StaticProjectionCache | None = None,
                check: bool = True) -> torch.Tensor:
        """``cache`` makes positions fed one at a time (generation) embed exactly as a whole image (training)."""
        # indices of the positions in ``codes`` (taken before the projection advances the cache)
        index = torch.arange(codes.shape[2], device=codes.device) + (cache.length if cache is not None else 0)
        f = self.lookup(codes, check).to(self.mm_projector[1].weight.dtype)
        x = self.mm_projector(self.attn_projection(f, cache))
        if self.position_embedding is not None:
            x = x + self.position_embedding(index)
        return x


class DepthHead(nn.Module):
    """Emits the K sub-codes of one image position from the backbone state before it (reference ``AR_head``)."""

    def __init__(self, config: UniTokMLLMConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.depth_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.linear_head = nn.Linear(config.hidden_size, config.codebook_size)
        # table i embeds sub-code i as the input that predicts sub-code i+1 (none for the last one)
        self.codebooks = nn.ModuleList(nn.Embedding(config.codebook_size, config.hidden_size)
                                       for _ in range(config.num_codebooks - 1))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-codes ``[R, k]`` (books 0..k-1, k < K) -> ``[R, k, hidden]``."""
        return torch.stack([self.codebooks[i](codes[:, i]) for i in range(codes.shape[1])], dim=1)

    def forward(self, inputs_embeds: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Depth sequences ``[R, T, hidden]`` (continuing ``cache`` if given) -> normed states."""
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = hf.create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=None,
                                     position_ids=position_ids, **hf.cache_kwarg(cache))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                      position_embeddings=position_embeddings, **hf.cache_kwarg(cache))
        return self.norm(x)

    def teacher_forced_logits(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Context states ``[R, hidden]`` and target codes ``[R, K]`` -> logits ``[R, K, V]`` (one batched pass)."""
        x = torch.cat((context[:, None], self.embed_codes(codes[:, :-1])), dim=1)
        return self.linear_head(self(x))


@dataclass
@hf.with_cache_field  # + the KV cache, under transformers' name for it (``hf.CACHE``)
class UniTokMLLMOutput(ModelOutput):
    """``loss`` is the reference's token-weighted total; the parts are reported beside it (detached counts)."""

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None  # sub-code CE + z-loss
    image_ce: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    n_text_tokens: int | None = None
    n_image_subcodes: int | None = None
    logits: torch.Tensor | None = None  # [B, L', vocab] when no labels; [n_text_targets, vocab] with labels
    image_logits: torch.Tensor | None = None  # [n_image_targets, K, codebook_size] with labels
    hidden_states: torch.Tensor | None = None  # final-normed backbone states, when asked


class UniTokMLLMPreTrainedModel(PreTrainedModel):
    config_class = UniTokMLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = [hf.CACHE]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _keep_in_fp32_modules_strict = ["code_embedder.quantizer"]  # the codebooks are a shared lookup table: never bf16

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' defaults (Linear/Embedding N(0, initializer_range), norms, rotary buffers) through its
        # ``init`` functions, which skip tensors already loaded from a checkpoint; then our own modules.
        super()._init_weights(module)
        if isinstance(module, PlainAttention):
            hf.init.zeros_(module.q_bias)
            hf.init.zeros_(module.v_bias)
            hf.init.zeros_(module.zero_k_bias)
        elif isinstance(module, SubCodebook):  # reference ``vocab_init = -1`` (overwritten by the tokenizer's books)
            bound = module.codebook.weight.shape[1] ** -0.5 / 36
            hf.init.uniform_(module.codebook.weight, -bound, bound)
            hf.init.zeros_(module.vocab_usage)


class UniTokMLLM(UniTokMLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniTokMLLMConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.code_embedder = CodeEmbedder(config)
        self.depth_head = DepthHead(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing: tuple[str, ...] = (), **kwargs):
        """transformers' loader, made strict: a tensor the checkpoint lacks (it would be left randomly
        initialised), holds in excess or holds in another shape is an error naming the tensors. ``allow_missing``:
        name prefixes a caller initialises itself."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except SafetensorError as err:  # a truncated or overwritten weights file
            raise ValueError(f"cannot load the model folder {pretrained_model_name_or_path}: its model.safetensors "
                             f"is damaged ({err})") from err
        except OSError as err:  # a missing or corrupt config.json, no weights file
            raise ValueError(f"cannot load the model folder {pretrained_model_name_or_path}: {err}") from err
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(tuple(allow_missing)))
        problems = [f"{what} {', '.join(sorted(keys)[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})"
                    for what, keys in (("missing", missing), ("unexpected", info["unexpected_keys"]),
                                       ("mis-shaped", [k[0] for k in info["mismatched_keys"]])) if keys]
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the checkpoint does not match the model: "
                             f"{'; '.join(problems)}")
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    # ------------------------------------------------------------------ inputs
    def embed_inputs(self, input_ids: torch.Tensor, image_codes: torch.Tensor | None = None,
                     run_embedder: bool = False) -> torch.Tensor:
        """Token embeddings with the code embedder's output spliced in at the image slots (no Python loop).
        ``run_embedder`` (training): without image slots the code embedder still runs once, with weight 0."""
        is_image = input_ids == self.config.image_placeholder_id
        n_slots = int(is_image.sum())
        bad = (input_ids < 0) & ~is_image
        if bad.any() or (input_ids >= self.config.vocab_size).any():
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {self.config.vocab_size}) "
                             f"that are not the image id {self.config.image_placeholder_id}")
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if n_slots == 0:
            if image_codes is not None and image_codes.numel():
                raise ValueError(f"{image_codes.shape[0]} images were given but input_ids have no image slots")
            return embeds + 0.0 * self._unused_image_side() if run_embedder else embeds
        N = self.config.image_positions
        if image_codes is None or image_codes.ndim != 3 or image_codes.shape[0] * image_codes.shape[2] != n_slots:
            got = "none" if image_codes is None else tuple(image_codes.shape)
            raise ValueError(f"input_ids have {n_slots} image slots ({n_slots / N:g} images of {N} positions) but "
                             f"image_codes are {got}; expected [{n_slots // N}, {self.config.num_codebooks}, {N}]")
        image_embeds = self.code_embedder(image_codes).to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None], image_embeds)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_codes: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
        **kwargs,
    ) -> UniTokMLLMOutput:
        cache = hf.take_cache(cache, kwargs)
        training = labels is not None and torch.is_grad_enabled()
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, image_codes, run_embedder=training)
        if labels is not None and use_cache is None:
            use_cache = False  # training: no cache, so packed rows (restarting position_ids) get a block mask
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **hf.cache_kwarg(cache), **kwargs)
        hidden = out.last_hidden_state
        result = UniTokMLLMOutput(hidden_states=hidden if output_hidden_states else None,
                                  **hf.cache_kwarg(hf.cache_of(out)))
        if labels is None:
            result.logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            return result
        if input_ids is None:
            raise ValueError("training with labels needs input_ids (to locate the image slots)")
        return self._loss(result, hidden, input_ids, labels, image_codes, num_items_in_batch, training)

    def _unused_image_side(self) -> torch.Tensor:
        """A scalar that depends on every trainable code-embedder parameter: one blank image through it."""
        cfg = self.config
        codes = torch.zeros((1, cfg.num_codebooks, cfg.image_positions), dtype=torch.long, device=self.device)
        return self.code_embedder(codes).mean()

    def _loss(self, result: UniTokMLLMOutput, hidden: torch.Tensor, input_ids: torch.Tensor,
              labels: torch.Tensor, image_codes: torch.Tensor | None, num_items_in_batch=None,
              training: bool = False) -> UniTokMLLMOutput:
        cfg = self.config
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
        context, targets = hidden[:, :-1], labels[:, 1:]  # state t predicts label t+1
        text_sel = targets >= 0
        image_sel = targets == cfg.image_placeholder_id
        if image_sel.any() and not (input_ids[:, 1:][image_sel] == cfg.image_placeholder_id).all():
            raise ValueError("labels mark image targets at positions whose input is not an image slot")
        sums, dummies = [], []
        n_txt = int(text_sel.sum())
        if n_txt:
            text_logits = self.lm_head(context[text_sel]).float()
            text_sum = F.cross_entropy(text_logits, targets[text_sel], reduction="sum")
            result.text_loss = text_sum / n_txt
            result.logits = text_logits
            sums.append(text_sum)
        elif training:
            dummies.append(self.lm_head(context[:1, 0]).mean())

        n_pos = int(image_sel.sum())
        n_sub = n_pos * cfg.num_codebooks
        if n_pos:
            # codes of every image slot, in slot order; pick those of the supervised slots
            codes_per_slot = image_codes.permute(0, 2, 1).reshape(-1, cfg.num_codebooks)
            slot_index = (input_ids == cfg.image_placeholder_id).flatten().cumsum(0).view_as(input_ids) - 1
            target_codes = codes_per_slot[slot_index[:, 1:][image_sel]].long()
            image_logits = self.depth_head.teacher_forced_logits(context[image_sel], target_codes).float()
            ce_sum = F.cross_entropy(image_logits.flatten(0, 1), target_codes.flatten(), reduction="sum")
            z_sum = cfg.z_loss_weight * image_logits.max(-1).values.pow(2).sum()
            result.image_ce, result.z_loss = ce_sum / n_sub, z_sum / n_sub
            result.image_loss = (ce_sum + z_sum) / n_sub
            result.image_logits = image_logits
            sums += [ce_sum, z_sum]
        elif training:
            blank = torch.zeros((1, cfg.num_codebooks), dtype=torch.long, device=context.device)
            dummies.append(self.depth_head.teacher_forced_logits(context[:1, 0], blank).mean())

        result.n_text_tokens, result.n_image_subcodes = n_txt, n_sub
        if not sums:
            raise ValueError("the batch has no supervised position (all labels are IGNORE_INDEX)")
        items = n_txt + n_sub if num_items_in_batch is None else num_items_in_batch
        result.loss = sum(sums) / items
        if dummies:  # weight 0: the loss and every gradient stay exactly what they are without them
            result.loss = result.loss + 0.0 * sum(dummies)
        return result

    # ------------------------------------------------------------------ generation glue (text)
    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, image_codes=None, **kwargs):
        return hf.prepare_generation_inputs(super().prepare_inputs_for_generation, image_codes, input_ids,
                                            inputs_embeds=inputs_embeds, **kwargs)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_llama(cls, path: str, unitok=None, **image_side) -> "UniTokMLLM":
        """Start from any Llama-architecture checkpoint on disk (folder with ``config.json``): the backbone and
        ``lm_head`` are loaded, the code embedder comes from ``unitok`` (a :class:`tokenizer.UniTok`), the depth
        head is freshly initialised (as the reference does when it loads Llama-2)."""
        from pathlib import Path

        config = UniTokMLLMConfig(**{**llama_fields(Path(path) / "config.json"), **image_side})
        model = cls(config)
        state = {k: v for k, v in read_state_dict(path).items() if not k.endswith("rotary_emb.inv_freq")}
        own = model.state_dict()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"{path} is not a Llama checkpoint matching its config: {bad[:5]}")
        if not any(k.startswith("model.layers.") for k in state):
            raise ValueError(f"{path} holds no Llama decoder layers (model.layers.*)")
        # only the image side is new; a backbone tensor the checkpoint lacks would stay randomly initialised
        new_modules = ("code_embedder.", "depth_head.") + (("lm_head.",) if config.tie_word_embeddings else ())
        missing = sorted(k for k in own if k not in state and not k.startswith(new_modules))
        if missing:
            raise ValueError(f"{path} lacks backbone tensors: {', '.join(missing[:6])}"
                             f"{' ...' if len(missing) > 6 else ''} ({len(missing)})")
        model.load_state_dict(state, strict=False)
        if config.tie_word_embeddings:
            model.tie_weights()
        if unitok is not None:
            model.load_tokenizer_weights(unitok)
        return model

    def load_tokenizer_weights(self, unitok) -> None:
        """Initialise the code embedder from a UniTok tokenizer, as the reference's ``initialize_embedder``:
        the quantiser codebooks, and the attention projection from the tokenizer's ``post_quant_proj``."""
        cfg = self.config
        tcfg = unitok.config
        if (tcfg.num_codebooks, tcfg.codebook_size, tcfg.latent_dim) != (cfg.num_codebooks, cfg.codebook_size,
                                                                           cfg.code_width):
            raise ValueError(f"tokenizer codes (K={tcfg.num_codebooks}, {tcfg.codebook_size} entries, latent "
                             f"{tcfg.latent_dim}) do not match the MLLM config (K={cfg.num_codebooks}, "
                             f"{cfg.codebook_size} entries, width {cfg.code_width})")
        self.code_embedder.quantizer.load_state_dict(unitok.quantizer.state_dict())
        try:
            self.code_embedder.attn_projection.load_state_dict(unitok.post_quant_proj.state_dict())
        except RuntimeError as e:
            raise ValueError(f"the tokenizer's post_quant_proj does not fit the code embedder's projection "
                             f"({cfg.code_width}->{cfg.projection_dim}, {cfg.projection_heads} heads): {e}") from None


__all__ = ["UniTokMLLM", "UniTokMLLMOutput", "CodeEmbedder", "DepthHead", "IGNORE_INDEX"]
