"""The serving engine: one thread owns the model and runs every request in one batch that requests join and leave at
step boundaries (continuous batching, as vLLM's scheduler does, over :mod:`mllm.generation`'s ``prefill`` /
``sample_position`` and a backbone step like ``advance``).

A *row* is one sequence in the backbone's KV cache. A chat request has one row. A text-to-image request has one row
plus, with guidance, its unconditional row. A chat reply that starts a picture (the model emits boi) gains its
unconditional row at that step, as :func:`mllm.generation.reply` guides against the unconditional prompt. A step:

1. waiting requests are prefilled together and their rows appended (the shorter side left-padded, which the
   attention mask and the per-row RoPE positions make exact);
2. from each row's last backbone state, a chat row in text mode draws a token (``lm_head``) and an image request draws
   the K sub-codes of a position (the depth head, guidance and sampling per request);
3. finished and cancelled requests leave: their rows are dropped, and cache columns that no row attends to any
   more are trimmed;
4. one backbone step feeds every remaining row its input: a token embedding or the code embedding of a position
   (each request's projection cache continues its own image).

A request draws randomness only from its own generator, seeded by its ``seed``, and every operation is per row, so
its output does not depend on what it was batched with (``tests/test_serve_engine.py`` checks it).

transformers' continuous-batching ``generate_batch`` does not fit this model: it schedules ``input_ids`` through its
own paged cache and sampler, while our prompts carry images (embedded by the code embedder) and a picture's position
is K sub-codes from the depth head. So text rows run in the same loop as pictures.
"""
from __future__ import annotations

import collections
import io
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mllm import hf_compat as hf
from mllm.generation import ImageSampling, TextSampling, filter_logits, left_pad, prefill, sample_position
from tokenizer.projection import ProjectionCache


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests; the client should retry later."""


@dataclass
class Event:
    """What the engine tells a request's owner: ``text`` (a new piece of the reply), ``image`` (PNG bytes of a
    finished picture), ``done`` (with the reply's whole ``text``, ``finish_reason`` and ``usage``) or ``error``
    (with ``text``)."""

    kind: str
    text: str = ""
    png: bytes = b""
    finish_reason: str | None = None
    usage: dict | None = None


@dataclass(eq=False)  # identity: a request is found in the queue as itself, never compared field by field
class Request:
    """One reply (``kind="chat"``: text, and a picture if the model starts one) or one picture (``kind="image"``:
    the prompt ends in boi). ``pixels`` ``[M, 3, S, S]`` are the prompt's images, in the order of its image slots;
    ``uncond_ids`` is the guidance prompt (ending in boi) for pictures."""

    kind: str
    prompt_ids: list[int]
    uncond_ids: list[int]
    text: TextSampling = field(default_factory=TextSampling)
    image: ImageSampling = field(default_factory=ImageSampling)
    seed: int = 0
    pixels: torch.Tensor | None = None
    on_event: Callable[[Event], None] = lambda event: None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # progress: touched by the engine thread only, apart from ``cancelled``
    cancelled: bool = False
    drawing: bool = False
    new_ids: list[int] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    projection: ProjectionCache = field(default_factory=ProjectionCache)

    @property
    def rows_needed(self) -> int:
        return 2 if self.image.guided else 1


@dataclass
class _Row:
    request: Request
    unconditional: bool = False


@dataclass
class _Batch:
    cache: object
    attention_mask: torch.Tensor  # [R, T]
    next_position: torch.Tensor  # [R]
    hidden: torch.Tensor  # [R, hidden]: final-normed state after each row's last input


class Rate:
    """Events per second over the last ``window`` seconds (for /metrics)."""

    def __init__(self, window: float = 10.0):
        self.window, self.marks, self.total = window, collections.deque(), 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.total += n
        self.marks.append((now, n))
        while self.marks and self.marks[0][0] < now - self.window:
            self.marks.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self.marks if t >= now - self.window) / self.window


class Engine:
    """Owns ``model`` (the MLLM), ``processor`` and ``unitok`` (encodes the prompts' images, decodes pictures).
    ``max_rows`` bounds the running batch (a guided picture takes 2 rows), ``max_queue`` the requests waiting."""

    def __init__(self, model, processor, unitok, max_rows: int = 16, max_queue: int = 64):
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2 (a guided picture takes 2 rows), got {max_rows}")
        self.model, self.processor, self.unitok = model, processor, unitok
        self.max_rows, self.max_queue = max_rows, max_queue
        self.device = model.device
        self.rows: list[_Row] = []
        self.batch: _Batch | None = None
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.image_positions, self.text_tokens = Rate(), Rate()
        self.steps = 0
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="unitok-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ API (any thread)
    def submit(self, request: Request) -> None:
        request.generator = torch.Generator(device=self.device).manual_seed(int(request.seed))
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
            self.waiting.append(request)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client left, or it timed out): it leaves the batch at the next step."""
        request.cancelled = True
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)

    def close(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()
        self.thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ the loop (engine thread)
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while not self.waiting and not self.rows and not self._stopping:
                    self.lock.wait()
                if self._stopping:
                    return
                admitted = self._take_admissible()
            with torch.inference_mode():
                if admitted:
                    try:  # a request that cannot be prefilled fails alone; the running batch is untouched
                        self._admit(admitted)
                    except Exception as err:
                        self._fail(admitted, err)
                if self.rows:
                    try:  # a bug or an out-of-memory fails the running requests, not the server
                        self._step()
                    except Exception as err:
                        running = list({id(r.request): r.request for r in self.rows}.values())
                        self.rows, self.batch = [], None
                        self._fail(running, err)

    @staticmethod
    def _fail(requests: list[Request], err: Exception) -> None:
        traceback.print_exc()
        for request in requests:
            request.on_event(Event("error", text=f"the engine failed: {type(err).__name__}: {err}"))

    def _take_admissible(self) -> list[Request]:
        taken, rows = [], len(self.rows)
        while self.waiting and rows + self.waiting[0].rows_needed <= self.max_rows:
            request = self.waiting.popleft()
            if not request.cancelled:
                taken.append(request)
                rows += 1 if request.kind == "chat" else request.rows_needed
        return taken

    def _admit(self, requests: list[Request]) -> None:
        prompts, rows, pixels = [], [], []
        for request in requests:
            prompts.append(request.prompt_ids)
            rows.append(_Row(request))
            if request.pixels is not None:
                pixels.append(request.pixels)
            request.drawing = request.kind == "image"
        for request in requests:  # unconditional rows after every conditional one
            if request.kind == "image" and request.image.guided:
                prompts.append(request.uncond_ids)
                rows.append(_Row(request, unconditional=True))
        codes = None
        if pixels:
            codes = self.unitok.encode(torch.cat(pixels).to(self.device))
        ids, mask = left_pad(prompts, self.processor.pad_token_id)
        state = prefill(self.model, ids.to(self.device), mask.to(self.device), codes)
        self._append(rows, _Batch(state.cache, state.attention_mask, state.next_position, state.hidden))

    def _append(self, rows: list[_Row], new: _Batch) -> None:
        if self.batch is None:
            self.rows, self.batch = rows, new
            return
        old = self.batch
        width = max(old.attention_mask.shape[1], new.attention_mask.shape[1])
        mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (old.attention_mask, new.attention_mask)])
        self.batch = _Batch(hf.concat_cache_rows(old.cache, new.cache, self.model.config), mask,
                            torch.cat((old.next_position, new.next_position)), torch.cat((old.hidden, new.hidden)))
        self.rows = self.rows + rows

    def _step(self) -> None:
        batch, rows = self.batch, self.rows
        tokens: dict[int, int] = {}  # row -> token to feed
        codes_of: dict[int, torch.Tensor] = {}  # row -> [K] codes to feed
        starts_picture: list[Request] = []

        text_rows = [i for i, r in enumerate(rows) if not r.request.drawing]
        if text_rows:
            logits = self.model.lm_head(batch.hidden[text_rows]).float()
            for j, i in enumerate(text_rows):
                request = rows[i].request
                token = sample_token(logits[j], request.text, request.generator)
                self.text_tokens.add(1)
                if self._take_token(request, token):
                    tokens[i] = token
                    if token == self.model.config.boi_token_id:
                        starts_picture.append(request)

        cond = [i for i, r in enumerate(rows) if r.request.drawing and not r.unconditional]
        if cond:
            requests = [rows[i].request for i in cond]
            uncond_of = {id(r.request): i for i, r in enumerate(rows) if r.unconditional}
            uncond = [uncond_of.get(id(q)) for q in requests]
            order = cond + [u for u in uncond if u is not None]
            local, u_rows = {row: k for k, row in enumerate(order)}, []
            for u in uncond:
                u_rows.append(None if u is None else local[u])
            codes, _ = sample_position(self.model, batch.hidden[order], [q.image for q in requests],
                                       [q.generator for q in requests], u_rows)
            self.image_positions.add(len(requests))
            finished = []
            for k, request in enumerate(requests):
                request.codes.append(codes[k])
                if len(request.codes) == self.model.config.image_positions:
                    finished.append(request)
                else:
                    codes_of[cond[k]] = codes[k]
                    if uncond[k] is not None:
                        codes_of[uncond[k]] = codes[local[uncond[k]]]
            self._finish_pictures(finished)

        keep = [i for i, r in enumerate(rows) if (i in tokens or i in codes_of) and not r.request.cancelled]
        self._keep(keep)
        if not self.rows:
            return
        self._feed([tokens.get(i) for i in keep], [codes_of.get(i) for i in keep])
        live = [q for q in starts_picture if not q.cancelled and q.finish_reason is None]
        for request in live:
            request.drawing = True
        guided = [q for q in live if q.image.guided]
        if guided:  # their unconditional rows join now: after boi they stand before position 0 together
            ids, mask = left_pad([q.uncond_ids for q in guided], self.processor.pad_token_id)
            state = prefill(self.model, ids.to(self.device), mask.to(self.device))
            self._append([_Row(q, unconditional=True) for q in guided],
                         _Batch(state.cache, state.attention_mask, state.next_position, state.hidden))
        self.steps += 1

    def _take_token(self, request: Request, token: int) -> bool:
        """Record a reply token; False when the reply ends with it (nothing more to feed)."""
        cfg, proc = self.model.config, self.processor
        if token == proc.eos_token_id:
            self._finish(request, "stop")
            return False
        request.new_ids.append(token)
        if token == cfg.boi_token_id:
            # the picture's positions must fit the context after the reply so far
            used = len(request.prompt_ids) + len(request.new_ids) + cfg.image_positions
            if used > cfg.max_position_embeddings:
                self._finish(request, "length")
                return False
            return True
        text = proc.tokenizer.decode(request.new_ids, skip_special_tokens=True).lstrip()
        for stop in request.text.stop_strings:
            if stop in text:
                self._finish(request, "stop", text.split(stop)[0].strip())
                return False
        self._emit_text(request, text)
        if len(request.new_ids) >= request.text.max_new_tokens:
            self._finish(request, "length")
            return False
        return True

    def _emit_text(self, request: Request, text: str, final: bool = False) -> None:
        """Send the part of ``text`` not sent yet. Until the reply ends, hold back an incomplete character and what
        could be the start of a stop string. (Decoding is not always prefix-stable: sentencepiece turns a whole run
        of byte pieces that is not valid UTF-8 into replacement characters, so the last event's ``text`` is the
        reply's exact text and the pieces are a preview of it.)"""
        if not final:
            if text.endswith("\ufffd"):
                return
            hold = max((len(s) - 1 for s in request.text.stop_strings), default=0)
            text = text[:len(text) - hold] if hold else text
        if text.startswith(request.sent) and len(text) > len(request.sent):
            request.on_event(Event("text", text=text[len(request.sent):]))
            request.sent = text

    def _finish(self, request: Request, reason: str, text: str | None = None) -> None:
        """End a request: the rest of its text, then ``done`` with the reply's whole text and the usage."""
        if text is None:
            text_ids = [t for t in request.new_ids if t != self.model.config.boi_token_id]
            text = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        self._emit_text(request, text, final=True)
        request.finish_reason = reason
        completion = len(request.new_ids) + len(request.codes)
        request.on_event(Event("done", text=text, finish_reason=reason, usage={
            "prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(request.prompt_ids) + completion}))

    def _finish_pictures(self, requests: list[Request]) -> None:
        from tokenizer.image import to_pil

        for request in requests:
            # one picture per decode: a batched decode rounds some pixels differently with the batch size, and a
            # picture must not depend on what finished with it
            pixels = self.unitok.decode(torch.stack(request.codes, dim=1)[None].to(self.device))[0].cpu()
            buffer = io.BytesIO()
            to_pil(pixels).save(buffer, format="PNG")
            request.on_event(Event("image", png=buffer.getvalue()))
            self._finish(request, "stop")

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.batch = [], None
            return
        batch, index = self.batch, torch.tensor(keep, device=self.device)
        hf.select_cache_rows(batch.cache, index)
        mask = batch.attention_mask.index_select(0, index)
        unused = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused:
            hf.drop_cache_columns(batch.cache, unused)
            mask = mask[:, unused:]
        self.rows = [self.rows[i] for i in keep]  # a picture's two rows always leave together
        self.batch = _Batch(batch.cache, mask, batch.next_position.index_select(0, index),
                            batch.hidden.index_select(0, index))

    def _feed(self, tokens: list[int | None], codes: list[torch.Tensor | None]) -> None:
        """One backbone step: row i gets ``tokens[i]``'s embedding or the code embedding of ``codes[i]``."""
        model, batch = self.model, self.batch
        embeds = torch.empty((len(self.rows), 1, model.config.hidden_size), dtype=model.dtype, device=self.device)
        token_rows = [i for i, t in enumerate(tokens) if t is not None]
        if token_rows:
            ids = torch.tensor([tokens[i] for i in token_rows], device=self.device)
            embeds[token_rows] = model.get_input_embeddings()(ids)[:, None].to(model.dtype)
        # pictures: each request's rows continue its own projection cache; requests at the same position run together
        by_length: dict[int, list[Request]] = {}
        rows_of: dict[int, list[int]] = collections.defaultdict(list)
        for i, c in enumerate(codes):
            if c is not None:
                request = self.rows[i].request
                rows_of[id(request)].append(i)
                if len(rows_of[id(request)]) == 1:
                    by_length.setdefault(request.projection.length, []).append(request)
        for requests in by_length.values():
            row_index = [i for q in requests for i in rows_of[id(q)]]
            caches = [q.projection for q in requests]
            shared = ProjectionCache()
            if caches[0].k is not None:
                shared.k, shared.v = torch.cat([c.k for c in caches]), torch.cat([c.v for c in caches])
            stacked = torch.stack([codes[i] for i in row_index])  # [r, K]
            out = model.code_embedder(stacked[:, :, None], cache=shared).to(model.dtype)  # [r, 1, hidden]
            embeds[row_index] = out
            start = 0
            for q in requests:
                n = len(rows_of[id(q)])
                q.projection.k, q.projection.v = shared.k[start:start + n], shared.v[start:start + n]
                start += n
        mask = F.pad(batch.attention_mask, (0, 1), value=1)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=batch.next_position[:, None],
                    use_cache=True, logits_to_keep=1, output_hidden_states=True, **hf.cache_kwarg(batch.cache))
        self.batch = _Batch(hf.cache_of(out), mask, batch.next_position + 1, out.hidden_states[:, -1])


def sample_token(logits: torch.Tensor, sampling: TextSampling, generator: torch.Generator | None) -> int:
    """One token from ``logits`` [V]: argmax at temperature 0, else top-k / top-p sampling from ``generator``."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits[None] / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
