"""Generation: text (chat) through transformers' ``generate``, images through a cached position × sub-code loop.

Image generation, per image position j (N positions, K sub-codes each):

1. the backbone state ``h`` before position j (KV cache, one token per step after the prompt);
2. the depth head runs K single-token steps over ``[h, E_0(c^0), …]`` with its **own KV cache**; the linear head reads
   only the newest slot; classifier-free guidance mixes the conditional and unconditional rows,
   ``uncond + scale · (cond − uncond)``, and one sub-code is drawn per request (the unconditional row follows it);
3. the K chosen sub-codes are embedded by the code embedder **with its projection KV cache**, so position j is
   embedded exactly as in training (the reference embeds it alone — its spec §h.2 bug), and fed to the backbone.

A greedy rollout therefore equals the argmax of the teacher-forced logits on its own output. The loop is split into
small functions (:func:`prefill`, :func:`sample_position`, :func:`advance`) so that a server can batch requests
(its rows join and leave, so it keeps growing caches). :func:`generate_image_codes` runs a fixed batch through
:class:`mllm.decoding.StaticImageDecoder` instead: preallocated buffers, fused projections, no host sync per position,
and optionally ``torch.compile`` (``compile=True``; ``compile_mode="reduce-overhead"`` adds CUDA graphs on a GPU),
with the same greedy output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from tokenizer.projection import ProjectionCache

from . import hf_compat as hf
from .conversation import IMAGE_PLACEHOLDER
from .decoding import DepthDecoder, StaticImageDecoder
from .modeling import UniTokMLLM


@dataclass
class ImageSampling:
    """Sampling of every sub-code. ``temperature=0`` is greedy; ``top_k=0`` / ``top_p=1`` disable the filters.
    ``cfg_scale=1`` turns guidance off (no unconditional rows are run)."""

    cfg_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.cfg_scale < 0:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, "
                             f"0 < top_p <= 1, cfg_scale >= 0")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering (masked entries become -inf); the most likely entry always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the first entry that crosses the threshold
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: ImageSampling, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One index per row of ``logits`` [B, V]; row b draws from ``generators[b]`` when given (per-request seeds)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


@dataclass
class ImageGenerationState:
    """Everything one batched image rollout carries between positions (rows: B conditional [+ B unconditional])."""

    cache: Cache
    attention_mask: torch.Tensor  # [R, T] (prompt padding + generated positions)
    next_position: torch.Tensor  # [R] rope position of the next token
    hidden: torch.Tensor  # [R, hidden] final-normed backbone state before the next image position
    projection_cache: ProjectionCache = field(default_factory=ProjectionCache)
    codes: list[torch.Tensor] = field(default_factory=list)  # per position [B, K]
    logits: list[torch.Tensor] = field(default_factory=list)  # per position guided logits [B, K, V] (if kept)


@torch.no_grad()
def prefill(model: UniTokMLLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            image_codes: torch.Tensor | None = None) -> ImageGenerationState:
    """Run the (left-padded) prompts, each ending in boi; rope positions skip the padding. ``image_codes``
    ``[M, K, N]`` fill the prompts' image slots in order (a chat that shows images before asking for one)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, image_codes=image_codes,
                cache=hf.new_dynamic_cache(model.config), use_cache=True, logits_to_keep=1, output_hidden_states=True)
    return ImageGenerationState(cache=hf.cache_of(out), attention_mask=attention_mask,
                                next_position=position_ids[:, -1] + 1, hidden=out.hidden_states[:, -1])


@torch.no_grad()
def sample_position(model: UniTokMLLM, hidden: torch.Tensor, sampling: ImageSampling | list[ImageSampling],
                    generators: list[torch.Generator] | None = None,
                    uncond_rows: list[int | None] | None = None,
                    decoder: StaticImageDecoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The K sub-codes of one position from backbone states ``[R, hidden]``.

    Rows ``0..B-1`` are the B requests. With one ``sampling`` for all of them, rows ``B..2B-1`` are their
    unconditional rows when it is guided (R = 2B). A server's mixed batch gives one setting per request and
    ``uncond_rows[b]``, the row of request b's unconditional prompt (``None``: unguided). Returns the codes of all R
    rows ``[R, K]`` (an unconditional row follows its request's choice) and the guided logits ``[B, K, V]``.
    ``decoder``: a static decoder of these rows, whose (compiled) depth step and buffers are used."""
    head, K = model.depth_head, model.config.num_codebooks
    if isinstance(sampling, ImageSampling):
        B = hidden.shape[0] // (2 if sampling.guided else 1)
        samplings = [sampling] * B
        uncond_rows = [B + b if sampling.guided else None for b in range(B)]
    else:
        samplings, B = list(sampling), len(sampling)
        uncond_rows = list(uncond_rows) if uncond_rows is not None else [None] * B
        if any(s.guided != (u is not None) for s, u in zip(samplings, uncond_rows)):
            raise ValueError("a request is guided (cfg_scale != 1) exactly when it has an unconditional row")
    # requests with equal settings are sampled together (one group when the whole batch shares them)
    members_of: dict[tuple, list[int]] = {}
    for b, s in enumerate(samplings):
        members_of.setdefault((s.cfg_scale, s.temperature, s.top_k, s.top_p), []).append(b)
    device = hidden.device

    def index(rows: list[int]) -> torch.Tensor:
        # a contiguous run is made on the device (a copy from a host list would wait for the device on a GPU)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        return (torch.arange(rows[0], rows[0] + len(rows), device=device) if contiguous
                else torch.tensor(rows, device=device))

    groups = [(samplings[m[0]], index(m), index([uncond_rows[b] for b in m]) if samplings[m[0]].guided else None,
               None if generators is None else [generators[b] for b in m]) for m in members_of.values()]
    if decoder is None:
        depth = DepthDecoder(head, hidden.shape[0], fuse=False)
        step, cache = depth.step, depth.new_cache(hidden)
    else:
        step, cache = decoder.depth_step, decoder.depth_cache_reset()
    x = hidden
    codes, logits_per_book = [], []
    for k in range(K):
        logits = head.linear_head(step(x, cache)).float()
        code = torch.empty(hidden.shape[0], dtype=torch.long, device=device)
        guided_logits = torch.empty((B, logits.shape[-1]), dtype=logits.dtype, device=device)
        for s, rows, uncond, group_generators in groups:
            group_logits = logits[rows]
            if uncond is not None:
                group_logits = logits[uncond] + s.cfg_scale * (group_logits - logits[uncond])
            chosen = choose(group_logits, s, group_generators)
            code[rows] = chosen
            if uncond is not None:
                code[uncond] = chosen  # the unconditional row follows the guided choice
            guided_logits[rows] = group_logits
        codes.append(code)
        logits_per_book.append(guided_logits)
        if k < K - 1:
            x = head.codebooks[k](code)
    return torch.stack(codes, 1), torch.stack(logits_per_book, 1)


@torch.no_grad()
def advance(model: UniTokMLLM, state: ImageGenerationState, codes: torch.Tensor) -> None:
    """Feed one image position (codes ``[R, K]``) to the code embedder and the backbone."""
    embeds = model.code_embedder(codes[:, :, None], cache=state.projection_cache)
    state.attention_mask = F.pad(state.attention_mask, (0, 1), value=1)
    out = model(inputs_embeds=embeds.to(model.dtype), attention_mask=state.attention_mask,
                position_ids=state.next_position[:, None], cache=state.cache, use_cache=True,
                logits_to_keep=1, output_hidden_states=True)
    state.cache, state.hidden = hf.cache_of(out), out.hidden_states[:, -1]
    state.next_position = state.next_position + 1


@torch.no_grad()
def generate_image_codes(model: UniTokMLLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         sampling: ImageSampling, generators: list[torch.Generator] | None = None,
                         num_positions: int | None = None, keep_logits: bool = False,
                         image_codes: torch.Tensor | None = None, compile: bool = False,
                         compile_mode: str | None = None) -> ImageGenerationState:
    """Rollout from padded prompts (with guidance: B conditional rows then B unconditional rows).
    ``state.codes`` stacked along positions gives ``[B, K, N]`` (see :func:`generate_images`). The positions run
    through a static decoder (its buffers hold the caches: ``state.cache`` stays the prompt's); ``compile`` compiles
    its steps, once per model, batch shape and prompt bucket."""
    N = num_positions or model.config.image_positions
    if sampling.guided and input_ids.shape[0] % 2:
        raise ValueError("with guidance the prompts must be B conditional rows followed by B unconditional rows")
    state = prefill(model, input_ids, attention_mask, image_codes)
    decoder = StaticImageDecoder.for_model(model, input_ids.shape[0], input_ids.shape[1], N, compile, compile_mode)
    decoder.start(state.cache, attention_mask, state.next_position)
    B = input_ids.shape[0] // (2 if sampling.guided else 1)
    for j in range(N):
        codes, logits = sample_position(model, state.hidden, sampling, generators, decoder=decoder)
        state.codes.append(codes[:B])
        if keep_logits:
            state.logits.append(logits)
        if j < N - 1:
            state.hidden = decoder.advance(codes)
    return state


@torch.no_grad()
def generate_image_codes_growing(model: UniTokMLLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 sampling: ImageSampling, generators: list[torch.Generator] | None = None,
                                 image_codes: torch.Tensor | None = None) -> ImageGenerationState:
    """The same rollout as :func:`generate_image_codes` with growing caches (transformers' ``DynamicCache``, the
    projection's concatenating cache): the steps a server composes, and the loop the static decoder is measured and
    tested against (``benchmarks/bench_mllm_generation.py``, ``tests/test_decoding.py``)."""
    state = prefill(model, input_ids, attention_mask, image_codes)
    B = input_ids.shape[0] // (2 if sampling.guided else 1)
    for j in range(model.config.image_positions):
        codes, _ = sample_position(model, state.hidden, sampling, generators)
        state.codes.append(codes[:B])
        if j < model.config.image_positions - 1:
            advance(model, state, codes)
    return state


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_images(model: UniTokMLLM, processor, prompts: list[str], sampling: ImageSampling | None = None,
                    seeds: list[int] | None = None, unconditional_prompt: str | None = None) -> torch.Tensor:
    """Prompts -> image codes ``[B, K, N]`` (decode them with the UniTok tokenizer). ``seeds`` gives each prompt
    its own generator, so a request's image does not depend on what it was batched with."""
    sampling = sampling or ImageSampling()
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    rows = [processor.generation_prompt(p) for p in prompts]
    # the prompt (ending in boi), then the image positions must fit the context (RoPE beyond it is untrained)
    room = model.config.max_position_embeddings - model.config.image_positions
    for p, row in zip(prompts, rows):
        if len(row) > room:
            raise ValueError(f"prompt of {len(row)} tokens ({p[:40]!r}...) leaves no room for the image: at most "
                             f"{room} prompt tokens fit the model's context of {model.config.max_position_embeddings}")
    if sampling.guided:
        rows += [processor.generation_prompt(unconditional_prompt, unconditional=True)] * len(prompts)
    ids, mask = left_pad(rows, processor.pad_token_id)
    generators = None if seeds is None else [torch.Generator(device=model.device).manual_seed(int(s)) for s in seeds]
    state = generate_image_codes(model, ids.to(model.device), mask.to(model.device), sampling, generators)
    return torch.stack(state.codes, dim=2)


__all__ = ["TextSampling", "generate_text_ids", "generate_replies", "chat", "reply", "Reply", "ImageSampling",
           "filter_logits", "choose", "prefill", "sample_position", "advance", "generate_image_codes",
           "generate_image_codes_growing", "generate_images", "left_pad"]


# ---------------------------------------------------------------------------- text
@dataclass
class TextSampling:
    """``temperature=0`` is greedy. ``stop_strings`` end the reply early (on top of eos)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [f"{name}={value!r} (need {rule})" for name, value, ok, rule in (
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "0 < top_p <= 1"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0")) if not ok]
        if bad:
            raise ValueError("invalid text sampling settings: " + ", ".join(bad))


@torch.no_grad()
def generate_text_ids(model: UniTokMLLM, input_ids: torch.Tensor, image_codes: torch.Tensor | None = None,
                      sampling: TextSampling | None = None, eos_token_id: int | None = None,
                      pad_token_id: int | None = None, tokenizer=None, streamer=None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """New token ids ``[B, T]`` after (left-padded) prompts that may contain image slots, with transformers'
    ``generate`` (KV cache, sampling, stop strings, streaming). The prompt is embedded once, images included."""
    sampling = sampling or TextSampling()
    if input_ids.shape[1] + sampling.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                         f"model's context of {model.config.max_position_embeddings}")
    embeds = model.embed_inputs(input_ids, image_codes)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = dict(do_sample=sampling.temperature > 0, max_new_tokens=sampling.max_new_tokens)
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    if sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = sampling.repetition_penalty
    if sampling.stop_strings:
        if tokenizer is None:
            raise ValueError("stop strings need the text tokenizer")
        kwargs.update(stop_strings=list(sampling.stop_strings), tokenizer=tokenizer)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    return model.generate(inputs_embeds=embeds, attention_mask=attention_mask, eos_token_id=eos,
                          pad_token_id=0 if pad is None else pad, streamer=streamer, **kwargs)


def generate_replies(model: UniTokMLLM, processor, prompts: list[list[int]], image_codes: torch.Tensor | None,
                     sampling: TextSampling | None = None) -> list[str]:
    """Replies to prompt ids (``image_codes`` fill their image slots in order), decoded in one left-padded batch;
    each reply ends at its first eos."""
    ids, mask = left_pad(prompts, processor.pad_token_id)
    new = generate_text_ids(model, ids.to(model.device), image_codes, sampling, eos_token_id=processor.eos_token_id,
                            pad_token_id=processor.pad_token_id, attention_mask=mask.to(model.device))
    eos = processor.eos_token_id
    return [processor.decode(row[:row.index(eos)] if eos in row else row) for row in new.tolist()]


@dataclass
class Reply:
    """An assistant turn: its text and, when the model answered with a picture (it emitted boi), the picture's
    codes ``[K, N]``. In the conversation history the picture is an ``<image>`` placeholder after the text."""

    text: str
    image_codes: torch.Tensor | None = None

    def message(self) -> dict:
        content = self.text if self.image_codes is None else (self.text + " " + IMAGE_PLACEHOLDER).strip()
        return {"role": "assistant", "content": content}


def _text_turn(model: UniTokMLLM, processor, messages: list[dict], codes: torch.Tensor | None,
               sampling: TextSampling | None, streamer) -> tuple[list[int], list[int], str, bool]:
    """Prompt ids, new ids, their text, and whether the reply ends in boi (the model starts a picture)."""
    ids = processor.chat_prompt(messages)
    if processor.max_length is not None and len(ids) > processor.max_length:
        raise ValueError(f"the conversation has {len(ids)} tokens, more than the limit {processor.max_length}")
    boi = model.config.boi_token_id
    new = generate_text_ids(model, torch.tensor([ids], device=model.device), codes, sampling,
                            eos_token_id=[processor.eos_token_id, boi], pad_token_id=processor.pad_token_id,
                            tokenizer=processor.tokenizer, streamer=streamer)[0].tolist()
    draws = bool(new) and new[-1] == boi
    text = processor.decode(new[:-1] if draws else new)
    for stop in (sampling.stop_strings if sampling else ()):
        text = text.split(stop)[0]
    return ids, new, text.strip(), draws


def reply(model: UniTokMLLM, processor, messages: list[dict], image_codes: torch.Tensor | None = None,
          sampling: TextSampling | None = None, streamer=None, image_sampling: ImageSampling | None = None,
          seed: int | None = None) -> Reply:
    """One assistant turn after ``messages`` (``<image>`` placeholders in order of ``image_codes`` [M, K, N]).
    Text is generated until eos or boi; after boi the image is drawn by the image loop (with guidance against the
    unconditional prompt, as text-to-image), conditioned on the whole conversation so far."""
    codes = None if image_codes is None else image_codes.to(model.device)
    ids, new, text, draws = _text_turn(model, processor, messages, codes, sampling, streamer)
    if not draws:
        return Reply(text)
    image_sampling = image_sampling or ImageSampling(cfg_scale=3.0, temperature=1.0)
    rows = [ids + new]
    if image_sampling.guided:
        rows.append(processor.generation_prompt(None, unconditional=True))
    pad_ids, mask = left_pad(rows, processor.pad_token_id)
    generators = None if seed is None else [torch.Generator(device=model.device).manual_seed(int(seed))]
    state = generate_image_codes(model, pad_ids.to(model.device), mask.to(model.device), image_sampling, generators,
                                 image_codes=codes)
    return Reply(text, torch.stack(state.codes, dim=2)[0])


def chat(model: UniTokMLLM, processor, messages: list[dict], image_codes: torch.Tensor | None = None,
         sampling: TextSampling | None = None, streamer=None) -> str:
    """The text of one assistant reply; a reply that starts a picture ends at boi, undrawn (see :func:`reply`)."""
    codes = None if image_codes is None else image_codes.to(model.device)
    return _text_turn(model, processor, messages, codes, sampling, streamer)[2]
