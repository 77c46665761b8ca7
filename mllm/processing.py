"""Turn text, conversations and images into token ids and labels (one place for every sample layout).

Layouts (spec §c; N image slots per image, ``I`` = ``image_placeholder_id``):

* text→image  ``[bos, prompt + suffix, boi, I×N, eoi, eos]`` — text ignored; boi, eoi, eos trained as text; the
  image slots carry ``I`` in ``labels`` (their codes are targets of the depth head);
* image→text  ``[bos, boi, I×N, eoi, caption, eos]`` — caption and eos trained;
* chat        the template's rendering, ``<image>`` replaced by ``[boi] I×N [eoi]`` (markers per template);
  assistant replies and their end-of-turn token trained;
* text        ``[bos, text, eos]`` — all trained.

Chat text is tokenised in chunks split at ``<image>`` (the first with bos), exactly as LLaVA's
``tokenizer_image_token`` does, so prompts for the released weights get the reference's ids. Which tokens are
trained is decided from character offsets (a token is trained if it overlaps a trained span), not from per-turn
length arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .configuration import IGNORE_INDEX, UniTokMLLMConfig
from .conversation import IMAGE_PLACEHOLDER, ChatTemplate, get_template


class SampleTooLong(ValueError):
    """A sample exceeds ``max_length`` (never truncated through an image or a reply; the data layer skips it)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int = 0
    generates_image: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


class MLLMProcessor:
    def __init__(self, tokenizer, config: UniTokMLLMConfig, template: str | ChatTemplate | None = None,
                 max_length: int | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.template = template if isinstance(template, ChatTemplate) else get_template(template or
                                                                                        config.chat_template)
        self.max_length = max_length
        self.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.pad_token_id = 0 if pad is None else pad
        self.image_placeholder_id = config.image_placeholder_id
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"the text tokenizer has {len(tokenizer)} tokens but the model vocabulary only "
                             f"{config.vocab_size}")

    # ------------------------------------------------------------------ pieces
    def _ids(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return [self.bos_token_id, *ids] if bos else ids

    def image_slots(self, markers: bool = True) -> list[int]:
        slots = [self.image_placeholder_id] * self.config.image_positions
        return [self.config.boi_token_id, *slots, self.config.eoi_token_id] if markers else slots

    def _finish(self, ids: list[int], labels: list[int], **kw) -> Encoded:
        if self.max_length is not None and len(ids) > self.max_length:
            raise SampleTooLong(f"sample has {len(ids)} tokens, more than max_length {self.max_length}")
        return Encoded(ids, labels, **kw)

    # ------------------------------------------------------------------ training samples
    def text_to_image(self, prompt: str | None) -> Encoded:
        """``prompt=None`` gives the unconditional sample (classifier-free-guidance dropout)."""
        cfg = self.config
        text = self._ids(self.template.t2i_text(prompt), bos=True)
        image = [cfg.boi_token_id] + [self.image_placeholder_id] * cfg.image_positions + [cfg.eoi_token_id,
                                                                                     self.eos_token_id]
        # boi/eoi/eos are text targets; image slots labelled with the image id are depth-head targets
        ids, labels = text + image, [IGNORE_INDEX] * len(text) + image
        return self._finish(ids, labels, num_images=1, generates_image=True)

    def image_to_text(self, caption: str) -> Encoded:
        head = [self.bos_token_id] + self.image_slots(markers=True)
        tail = self._ids(caption) + [self.eos_token_id]
        return self._finish(head + tail, [IGNORE_INDEX] * len(head) + tail, num_images=1)

    def text(self, text: str) -> Encoded:
        ids = self._ids(text, bos=True) + [self.eos_token_id]
        return self._finish(ids, list(ids))

    def text_chunks(self, text: str, chunk_tokens: int) -> list[Encoded]:
        """A text document (bos … eos) split into consecutive chunks of at most ``chunk_tokens`` tokens, every
        token trained once (per-document chunks, as LM trainers do; packing then fills the rows). A last chunk of
        one token has no next-token target and is dropped."""
        ids = self._ids(text, bos=True) + [self.eos_token_id]
        chunks = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
        return [Encoded(c, list(c)) for c in chunks if len(c) > 1]

    def chat(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        """A conversation (LLaVA ``conversations`` converted to role/content messages); assistant turns trained.
        With ``add_generation_prompt`` it is an inference prompt ending in the assistant role."""
        text, spans = self.template.render(messages, add_generation_prompt)
        ids, labels, images, offset = [], [], 0, 0
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                at = offset - len(IMAGE_PLACEHOLDER)  # where this image's placeholder starts in ``text``
                if any(s <= at < e for s, e in spans):
                    # an image the assistant draws: boi, its codes (depth-head targets) and eoi are all trained,
                    # as in a text-to-image sample; boi is how the model says "an image follows"
                    slots = self.image_slots(markers=True)
                    labels += slots
                else:
                    slots = self.image_slots(self.template.image_markers)
                    labels += [IGNORE_INDEX] * len(slots)
                ids += slots
                images += 1
            enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=bool(spans))
            if i == 0:
                ids.append(self.bos_token_id)
                labels.append(IGNORE_INDEX)
            ids += enc.input_ids
            for token, (start, end) in zip(enc.input_ids, enc.offset_mapping if spans else ()):
                trained = any(start + offset < e and end + offset > s for s, e in spans)
                labels.append(token if trained else IGNORE_INDEX)
            if not spans:
                labels += [IGNORE_INDEX] * len(enc.input_ids)
            offset += len(chunk) + len(IMAGE_PLACEHOLDER)
        return self._finish(ids, labels, num_images=images)

    # ------------------------------------------------------------------ inference prompts
    def generation_prompt(self, prompt: str | None, unconditional: bool = False) -> list[int]:
        """Text-to-image prompt ids ending in boi (``unconditional``: the guidance prompt)."""
        return self._ids(self.template.t2i_text(None if unconditional else prompt), bos=True) + \
            [self.config.boi_token_id]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.chat(messages, add_generation_prompt=True).input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True).strip()
