"""The serving engine (serve/engine.py): continuous batching must not change any request's output.

A request run alone equals the library's one-request paths (``chat`` for greedy text, ``generate_images`` for a
seeded picture), and a request's text and picture are the same alone, inside a batch of differently-configured
requests, and when it joins a batch that is already running."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mllm.cli import load_mllm, load_unitok
from mllm.generation import ImageSampling, TextSampling, chat, generate_images, reply
from serve.engine import Engine, Event, QueueFull, Request


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mllm_train_helpers import write_tiny_pair

    root = write_tiny_pair(tmp_path_factory.mktemp("serve"), spread=2.0)
    model, processor = load_mllm(str(root / "mllm"))
    unitok = load_unitok(str(root / "unitok"), model, model.device)
    return model, processor, unitok


@pytest.fixture
def engine(stack):
    eng = Engine(*stack, max_rows=16, max_queue=8)
    yield eng
    eng.close()


class Collector:
    """Records a request's events; ``wait`` returns once it is done."""

    def __init__(self):
        self.events: list[Event] = []
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind in ("done", "error"):
            self.finished.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")

    @property
    def done(self) -> Event:
        return next(e for e in self.events if e.kind in ("done", "error"))


def chat_request(processor, messages, pixels=None, seed=0, **sampling) -> Request:
    return Request("chat", processor.chat_prompt(messages), processor.generation_prompt(None, unconditional=True),
                   text=TextSampling(**{"max_new_tokens": 12, **sampling}), image=ImageSampling(cfg_scale=3.0),
                   seed=seed, pixels=pixels, on_event=Collector())


def picture_request(processor, prompt, seed, **sampling) -> Request:
    return Request("image", processor.generation_prompt(prompt), processor.generation_prompt(None, unconditional=True),
                   image=ImageSampling(**sampling), seed=seed, on_event=Collector())


def run_together(engine: Engine, requests: list[Request], timeout: float = 120) -> list[Request]:
    with engine.lock:  # the engine thread waits: every request is admitted in the same step
        for r in requests:
            engine.submit(r)
    for r in requests:
        assert r.on_event.finished.wait(timeout), "request did not finish"
        assert r.on_event.done.kind == "done", r.on_event.done.text
    return requests


def codes_of(request: Request) -> torch.Tensor:
    return torch.stack(request.codes, dim=1)


def image_pixels(seed: int) -> torch.Tensor:
    return torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def mixed_batch(processor):
    """Chat (greedy, with an image), chat (sampled), and pictures: guided + top-k, unguided greedy, guided top-p."""
    msgs = [{"role": "user", "content": "<image>\nwhat colour is it"}]
    return [
        chat_request(processor, msgs, pixels=image_pixels(0)),
        chat_request(processor, [{"role": "user", "content": "how many circle"}], temperature=0.9, top_p=0.9),
        picture_request(processor, "a red circle", 7, cfg_scale=3.0, temperature=1.0, top_k=8),
        picture_request(processor, "two blue square", 1, cfg_scale=1.0, temperature=0.0),
        picture_request(processor, "a green triangle on the left", 3, cfg_scale=2.0, temperature=1.0, top_p=0.8),
    ]


def test_a_request_alone_equals_the_library_paths(engine, stack):
    model, processor, unitok = stack
    msgs = [{"role": "user", "content": "<image>\nwhat colour is it"}]
    pixels = image_pixels(0)
    [talk] = run_together(engine, [chat_request(processor, msgs, pixels=pixels)])
    expected = chat(model, processor, msgs, unitok.encode(pixels), TextSampling(max_new_tokens=12))
    assert talk.on_event.text == expected and expected  # the streamed pieces add up to chat()'s reply
    assert talk.on_event.done.usage["prompt_tokens"] == len(processor.chat_prompt(msgs))

    [picture] = run_together(engine, [picture_request(processor, "a red circle", 7, cfg_scale=3.0, top_k=8)])
    library = generate_images(model, processor, ["a red circle"], ImageSampling(cfg_scale=3.0, top_k=8), seeds=[7])
    assert torch.equal(codes_of(picture), library[0])
    png = next(e.png for e in picture.on_event.events if e.kind == "image")
    assert png.startswith(b"\x89PNG")


def test_outputs_do_not_depend_on_the_batch(engine, stack):
    _, processor, _ = stack
    alone = [run_together(engine, [r])[0] for r in mixed_batch(processor)]
    together = run_together(engine, mixed_batch(processor))
    for a, b in zip(alone, together):
        assert a.on_event.text == b.on_event.text
        assert a.new_ids == b.new_ids
        assert len(a.codes) == len(b.codes) and (not a.codes or torch.equal(codes_of(a), codes_of(b)))
    assert any(r.codes for r in alone) and any(r.new_ids for r in alone)
    other_seed = run_together(engine, [picture_request(processor, "a red circle", 8, cfg_scale=3.0, top_k=8)])[0]
    assert not torch.equal(codes_of(other_seed), codes_of(alone[2]))  # the seed is what varies a picture


def test_a_request_joining_a_running_batch_gets_its_own_output(engine, stack):
    _, processor, _ = stack
    first = mixed_batch(processor)
    late = picture_request(processor, "a blue circle on the right", 11, cfg_scale=3.0, top_k=8)
    late_alone = run_together(engine, [picture_request(processor, "a blue circle on the right", 11, cfg_scale=3.0,
                                                      top_k=8)])[0]
    with engine.lock:
        for r in first:
            engine.submit(r)
    while len(first[0].new_ids) < 2:  # the batch is running
        time.sleep(0.001)
    engine.submit(late)
    assert late.on_event.finished.wait(120)
    assert torch.equal(codes_of(late), codes_of(late_alone))
    for r in first:
        assert r.on_event.finished.wait(120)
    assert not any(r.on_event.done.kind == "error" for r in first)


def test_a_chat_reply_that_starts_a_picture_draws_it(engine, stack):
    """When the model emits boi, the reply's picture is drawn in the batch, guided by the unconditional prompt,
    as `reply` draws it."""
    model, processor, unitok = stack
    boi = model.config.boi_token_id

    def always_boi(module, inputs, output):
        output[..., boi] += 1e4
        return output

    handle = model.lm_head.register_forward_hook(always_boi)
    try:
        msgs = [{"role": "user", "content": "draw a red circle"}]
        request = chat_request(processor, msgs, seed=5)
        [drawn] = run_together(engine, [request])
        expected = reply(model, processor, msgs, image_sampling=ImageSampling(cfg_scale=3.0), seed=5)
    finally:
        handle.remove()
    assert expected.image_codes is not None
    assert torch.equal(codes_of(drawn), expected.image_codes)
    assert [e.kind for e in drawn.on_event.events] == ["image", "done"]
    assert drawn.on_event.done.usage["completion_tokens"] == 1 + model.config.image_positions


def test_limits_stop_and_cancel(engine, stack):
    model, processor, _ = stack
    eos = processor.eos_token_id
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill_(-1, torch.tensor([eos]), -1e4))
    try:
        [short] = run_together(engine, [chat_request(processor, [{"role": "user", "content": "what is it"}],
                                                     max_new_tokens=3)])
        [full] = run_together(engine, [chat_request(processor, [{"role": "user", "content": "what is it"}],
                                                    max_new_tokens=8)])
        stop = full.on_event.done.text.split()[1]
        [stopped] = run_together(engine, [chat_request(processor, [{"role": "user", "content": "what is it"}],
                                                       max_new_tokens=8, stop_strings=(stop,))])
    finally:
        handle.remove()
    assert short.on_event.done.finish_reason == "length" and short.on_event.done.usage["completion_tokens"] == 3
    assert full.on_event.done.text.startswith(short.on_event.done.text)
    head = full.on_event.done.text.split(stop)[0].strip()  # the reply ends before the stop string, never shows it
    assert stopped.on_event.done.finish_reason == "stop" and stopped.on_event.done.text == head
    assert stopped.on_event.text == head and stop not in stopped.on_event.text

    with engine.lock:  # the queue holds max_queue requests, then refuses
        held = [picture_request(processor, "a red circle", s, cfg_scale=3.0) for s in range(engine.max_queue)]
        for r in held:
            engine.submit(r)
        with pytest.raises(QueueFull):
            engine.submit(picture_request(processor, "a red circle", 99))
        for r in held:
            engine.cancel(r)
    assert engine.queue_depth == 0

    slow = picture_request(processor, "a red circle", 1, cfg_scale=3.0)
    engine.submit(slow)
    while not engine.running_rows:
        time.sleep(0.001)
    engine.cancel(slow)
    deadline = time.time() + 30
    while engine.running_rows and time.time() < deadline:
        time.sleep(0.01)
    assert engine.running_rows == 0 and not slow.on_event.finished.is_set()  # its rows left, nothing was sent


def test_a_request_that_fails_fails_alone(engine, stack):
    """A request the engine cannot run (here: pixels of the wrong size) gets an error event; a request running at
    the same time finishes with its own output, and the engine goes on serving."""
    _, processor, _ = stack
    alone = run_together(engine, [picture_request(processor, "a red circle", 7, cfg_scale=3.0, top_k=8)])[0]
    running = picture_request(processor, "a red circle", 7, cfg_scale=3.0, top_k=8)
    engine.submit(running)
    while not running.codes:
        time.sleep(0.001)
    broken = chat_request(processor, [{"role": "user", "content": "<image>\nwhat is it"}],
                          pixels=torch.zeros(1, 3, 32, 32))
    engine.submit(broken)
    assert broken.on_event.finished.wait(60) and broken.on_event.done.kind == "error"
    assert "the engine failed: ValueError" in broken.on_event.done.text
    assert running.on_event.finished.wait(60) and running.on_event.done.kind == "done"
    assert torch.equal(codes_of(running), codes_of(alone))
    assert engine.thread.is_alive()
