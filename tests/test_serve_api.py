"""`unitok serve` through the official `openai` client against a live server on 127.0.0.1: chat with images
(streaming and not), text-to-image, pictures drawn inside a chat reply, every class of refused request (each a 4xx
with an OpenAI error body, the server staying up), batching invariance across concurrent clients, disconnects,
/health and /metrics."""
from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")

from mllm.cli import load_mllm, load_unitok  # noqa: E402
from mllm_train_helpers import free_port, write_tiny_pair  # noqa: E402
from mllm.generation import ImageSampling, TextSampling, chat, generate_images  # noqa: E402
from serve.api import Limits, Server, create_app  # noqa: E402
from serve.engine import Engine  # noqa: E402

KEY = "test-key"


def start_uvicorn(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = write_tiny_pair(tmp_path_factory.mktemp("serve-api"), spread=2.0)
    model, processor = load_mllm(str(root / "mllm"))
    unitok = load_unitok(str(root / "unitok"), model, model.device)
    engine = Engine(model, processor, unitok, max_rows=16, max_queue=32)
    limits = Limits(max_body_bytes=1 << 20, max_image_bytes=200_000, max_image_pixels=1024 * 1024,
                    max_images_per_request=2, max_n=3, request_timeout=120)
    server = Server(engine, "tiny", limits, api_key=KEY)
    port = free_port()
    uv, thread = start_uvicorn(create_app(server), port)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"url": url, "client": client, "server": server, "model": model, "processor": processor, "unitok": unitok}
    uv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def png_data_url(seed: int = 0, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_with_image(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def expected_chat(live, url: str, text: str, max_new_tokens: int) -> str:
    """The library's greedy reply to the same conversation (the image preprocessed as the server does)."""
    from tokenizer.image import open_image, preprocess_padded

    raw = base64.b64decode(url.split(",", 1)[1])
    pixels = preprocess_padded(open_image(io.BytesIO(raw), "x"), 64)[None]
    codes = live["unitok"].encode(pixels)
    msgs = [{"role": "user", "content": "<image>\n" + text}]
    return chat(live["model"], live["processor"], msgs, codes, TextSampling(max_new_tokens=max_new_tokens))


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_models_health_and_the_page(live):
    assert [m.id for m in live["client"].models.list().data] == ["tiny"]
    assert httpx.get(live["url"] + "/health").json() == {"status": "ok"}
    page = httpx.get(live["url"] + "/ui")
    assert page.status_code == 200 and "Text to image" in page.text and "http" not in page.text.split("<script>")[0]


def test_chat_with_an_image_streaming_and_not(live):
    client, url = live["client"], png_data_url(1)
    msgs = user_with_image("what colour is it", url)
    reply = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10)
    expected = expected_chat(live, url, "what colour is it", 10)
    assert expected and reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > live["model"].config.image_positions and reply.usage.completion_tokens >= 1

    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_image_generation_returns_the_seeded_pictures(live):
    result = live["client"].images.generate(model="tiny", prompt="a red circle", n=2, size="64x64",
                                            response_format="b64_json",
                                            extra_body={"seed": 3, "cfg_scale": 3.0, "top_k": 8})
    images = [decoded(d.b64_json) for d in result.data]
    assert [im.shape for im in images] == [(64, 64, 3)] * 2
    codes = generate_images(live["model"], live["processor"], ["a red circle"] * 2,
                            ImageSampling(cfg_scale=3.0, top_k=8), seeds=[3, 4])
    from tokenizer.image import to_pil

    expected = [np.asarray(to_pil(live["unitok"].decode(c[None])[0])) for c in codes]  # one per decode
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))  # image i of a request uses seed + i
    assert not np.array_equal(images[0], images[1])
    assert result.usage.output_tokens == 2 * live["model"].config.image_positions


def test_a_chat_reply_can_carry_a_picture(live):
    model = live["model"]
    boi = model.config.boi_token_id
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_add_(
        -1, torch.tensor([boi]), torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        reply = live["client"].chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "draw a red circle"}], seed=5)
        chunks = list(live["client"].chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "draw a red circle"}], seed=5, stream=True))
    finally:
        handle.remove()
    message = reply.choices[0].message
    assert isinstance(message.content, str)
    [part] = message.model_extra["images"]
    assert part["type"] == "image_url" and decoded(part["image_url"]["url"].split(",", 1)[1]).shape == (64, 64, 3)
    streamed = [c.choices[0].delta.model_extra.get("images") for c in chunks if c.choices]
    assert [s for s in streamed if s] == [[part]]  # the same picture, streamed as delta.images


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    err = info.value
    assert set(err.body) >= {"message", "type"}, err.body  # the client unwraps {"error": {...}}
    return err


def test_every_bad_request_is_a_4xx_naming_the_problem(live, tmp_path):
    from test_faults import png_header_only

    client, url = live["client"], live["url"]
    ok_image = png_data_url(2)
    cases = [
        (lambda: client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}]),
         404, "`other` does not exist"),
        (lambda: client.images.generate(model="tiny", prompt="a red circle", size="512x512"), 400,
         "supported sizes: 64x64"),
        (lambda: client.images.generate(model="tiny", prompt="a red circle", n=4), 400, "maximum of 3"),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": ok_image}}] * 3, {"type": "text", "text": "hi"}]}]),
         400, "more than 2 images"),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10_000), 400, "maximum context length is 512"),
        (lambda: client.chat.completions.create(model="tiny", messages=user_with_image("hi", png_data_url(0, 400))),
         413, "over the limit of 200000"),
        (lambda: client.chat.completions.create(model="tiny", messages=user_with_image(
            "hi", "data:image/png;base64," + base64.b64encode(png_header_only(30000, 30000)).decode())),
         413, "image has 900000000 pixels, over the limit of 1048576"),
        (lambda: client.chat.completions.create(model="tiny", messages=user_with_image(
            "hi", "data:image/png;base64," + base64.b64encode(b"not a picture").decode())),
         400, "messages.0.content.0: cannot decode the image"),
        (lambda: client.chat.completions.create(model="tiny", messages=user_with_image(
            "hi", "http://127.0.0.1:1/x.png")), 400, "remote image URLs are refused"),
        (lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                temperature=-1), 400, "temperature"),
        (lambda: client.chat.completions.create(model="tiny", messages=[]), 400, "messages"),
        (lambda: openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list(), 401,
         "API key"),
    ]
    for call, status, named in cases:
        err = error_of(call)
        assert err.status_code == status and named in err.body["message"], (status, named, err.body)

    raw = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    big = httpx.post(url + "/v1/chat/completions", content=b" " * (2 << 20),
                     headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"]

    engine, limits = live["server"].engine, live["server"].limits
    engine.max_queue = 0  # a full queue
    try:
        err = error_of(lambda: client.images.generate(model="tiny", prompt="a red circle"))
        assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
    finally:
        engine.max_queue = 32
    limits.request_timeout = 1e-3
    try:
        err = error_of(lambda: client.images.generate(model="tiny", prompt="a red circle"))
        assert err.status_code == 504 and "did not finish within" in err.body["message"]
    finally:
        limits.request_timeout = 120
    assert httpx.get(url + "/health").status_code == 200  # still up, and still answering
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    metrics = httpx.get(url + "/metrics").text
    assert 'unitok_requests_total{endpoint="completions",status="400"}' in metrics
    assert 'unitok_requests_total{endpoint="models",status="401"} 1' in metrics
    assert "unitok_queue_depth 0" in metrics and "unitok_image_positions_total" in metrics


def test_remote_images_when_allowed(live, tmp_path):
    raw = base64.b64decode(png_data_url(3).split(",", 1)[1])
    (tmp_path / "x.png").write_bytes(raw)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    live["server"].limits.allow_remote_images = True
    try:
        remote = f"http://127.0.0.1:{files.server_address[1]}/x.png"
        reply = live["client"].chat.completions.create(model="tiny", messages=user_with_image("hi", remote),
                                                       max_tokens=6)
        inline = live["client"].chat.completions.create(model="tiny", messages=user_with_image("hi", png_data_url(3)),
                                                        max_tokens=6)
        assert reply.choices[0].message.content == inline.choices[0].message.content
        err = error_of(lambda: live["client"].chat.completions.create(
            model="tiny", messages=user_with_image("hi", remote + ".missing")))
        assert err.status_code == 400 and "HTTP 404" in err.body["message"]
    finally:
        live["server"].limits.allow_remote_images = False
        files.shutdown()


def test_concurrent_clients_get_what_they_get_alone(live):
    client = live["client"]
    jobs = [("image", dict(prompt="a red circle", extra_body={"seed": s, "cfg_scale": 3.0, "top_k": 8}))
            for s in range(4)]
    jobs += [("chat", dict(messages=user_with_image("what colour is it", png_data_url(s)), max_tokens=8,
                           temperature=0.8, seed=s)) for s in range(3)]

    def call(job):
        kind, kw = job
        if kind == "image":
            return client.images.generate(model="tiny", **kw).data[0].b64_json
        return client.chat.completions.create(model="tiny", **kw).choices[0].message.content

    alone = [call(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(call, jobs))
    assert [i for i, (a, b) in enumerate(zip(alone, together)) if a != b] == []  # PNG bytes and texts
    assert len(set(alone[:4])) == 4


def test_a_client_that_leaves_frees_its_rows(live):
    model, engine = live["model"], live["server"].engine
    eos = live["processor"].eos_token_id
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill_(-1, torch.tensor([eos]), -1e4))
    try:
        before = engine.text_tokens.total
        with httpx.stream("POST", live["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "max_tokens": 480}) as resp:
            next(resp.iter_lines())
        deadline = time.time() + 10
        while engine.running_rows and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running_rows == 0
        assert engine.text_tokens.total - before < 480  # it stopped early
    finally:
        handle.remove()


def test_a_bounded_load_has_no_errors(live):
    """benchmarks/bench_serve.py's load, small: 4 clients x 12 mixed requests, none may fail."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    load = bench.run_load(live["url"], clients=4, requests=12, api_key=KEY, max_tokens=6)
    assert load["errors"] == []
    assert {k: len(v) for k, v in load["latencies"].items()} == {"chat+image": 4, "chat": 4, "image": 4}
    assert "errors: 0" in bench.report(load)


def test_cors_is_off_unless_asked_for(live):
    from fastapi.testclient import TestClient

    preflight = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST"}
    plain = httpx.options(live["url"] + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers
    with TestClient(create_app(live["server"], ["http://example.org"])) as client:
        allowed = client.options("/v1/chat/completions", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "http://example.org"


@pytest.mark.parametrize("argv, named", [
    (["--max-batch-rows", "1"], "--max-batch-rows must be at least 2"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--model", "/nonexistent/model", "--tokenizer", "x"], "no model folder at /nonexistent/model"),
])
def test_serve_flags_are_checked_before_loading(argv, named, capsys, tmp_path, monkeypatch):
    import unitok_cli

    monkeypatch.chdir(tmp_path)
    if argv[0] != "--model":
        argv = [*argv, "--model", str(tmp_path), "--tokenizer", str(tmp_path)]
    code = unitok_cli.main(["serve", *argv])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_every_request_limit_is_a_serve_flag_with_the_limits_default():
    """The server's flags are made from ``Limits``: one per field, with its default, and a given value reaches the
    Limits the server is built with (a new limit cannot be forgotten in the CLI)."""
    import argparse
    import dataclasses

    from serve.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = p.parse_args([])
    assert Limits(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(Limits)}) == Limits()
    given = p.parse_args(["--max-n", "3", "--request-timeout", "2.5", "--allow-remote-images",
                          "--remote-fetch-timeout", "1.5"])
    assert (given.max_n, given.request_timeout, given.allow_remote_images, given.remote_fetch_timeout) == (3, 2.5, True,
                                                                                                          1.5)
