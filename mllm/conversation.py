"""Text formats of the MLLM: the chat template (instruction data, chat) and the text-to-image prompt.

A template renders messages to one string plus the character spans the model is trained on (assistant replies and
their end-of-turn separator). ``<image>`` in a message marks where an image goes; :mod:`mllm.processing` replaces
it by the image slots.

Templates:

* ``vicuna_v1`` — the released UniTok-MLLM (LLaVA's ``conv_vicuna_v1``)::

      A chat between ... questions. USER: <image>\\nWhat is it? ASSISTANT: A cat.</s>USER: ... ASSISTANT:

  images are bare slots (no boi/eoi), as the released understanding data and eval scripts use them.
* ``unitok`` (default for new models) — the same text format, but every image is framed by boi/eoi, the markers that
  also frame images in captioning and text-to-image samples, so an image looks the same to the model everywhere.
* ``unitok_nosys`` — ``unitok`` without the system prompt (``USER: ... ASSISTANT: ...</s>``): for models trained
  from scratch, where a fixed preamble carries no information and costs ~30 tokens per sample (the CPU demo).

Text-to-image prompts (both templates, as the reference): ``"<prompt> Generate an image based on this
description."`` followed by boi; the unconditional prompt for classifier-free guidance is ``"<unconditional>"``.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    image_markers: bool  # frame images with boi/eoi in chat
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "  # after the system prompt and after a user turn
    sep2: str = "</s>"  # after an assistant turn (the tokenizer's eos)
    t2i_suffix: str = " Generate an image based on this description."
    unconditional_prompt: str = "<unconditional>"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Messages ``[{"role": "user"|"assistant"|"system", "content": str}, ...]`` -> (text, trained spans).

        Turns must alternate user/assistant starting with the user; a leading ``system`` message replaces the
        template's system prompt. ``add_generation_prompt`` ends the text with the assistant role, ready to answer."""
        system = self.system
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0]["content"], messages[1:]
        text, spans = (system + self.sep if system else ""), []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} has role {role!r}; turns must alternate user/assistant, "
                                 f"starting with the user")
            if not isinstance(content, str):
                raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
            if role == "user":
                text += f"{self.roles[0]}: {content}{self.sep}"
            else:
                text += f"{self.roles[1]}:"
                start = len(text)
                text += f" {content}{self.sep2}"
                spans.append((start, len(text)))
        if add_generation_prompt:
            if len(messages) % 2 == 0:
                raise ValueError("a generation prompt needs the conversation to end with a user message")
            text += f"{self.roles[1]}:"
        return text, spans

    def t2i_text(self, prompt: str | None) -> str:
        """The text before boi in a text-to-image sample/prompt (``None``: the unconditional prompt)."""
        return self.unconditional_prompt if prompt is None else prompt + self.t2i_suffix


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate("vicuna_v1", _VICUNA_SYSTEM, image_markers=False),
    "unitok": ChatTemplate("unitok", _VICUNA_SYSTEM, image_markers=True),
    "unitok_nosys": ChatTemplate("unitok_nosys", "", image_markers=True),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
