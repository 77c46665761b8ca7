"""The OpenAI-compatible HTTP layer over :class:`serve.engine.Engine` (FastAPI): it validates, turns messages into
prompt ids and pixels, submits, and relays the engine's events as JSON or server-sent events.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (text and ``image_url`` parts, streaming), ``POST
/v1/images/generations``, ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /ui`` (the web page).
Pictures the model draws in a chat reply come back as ``message.images`` (``delta.images`` when streaming): a list
of ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``, the extension field
OpenAI-compatible routers use; ``message.content`` stays a string, so the official client parses the reply.
Every refused request gets an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import Engine, Event, QueueFull, Request

UI_PAGE = Path(__file__).with_name("ui.html")
API_KEY_ENV = "UNITOK_API_KEY"


@dataclass
class Limits:
    """What one request may ask for. ``unitok serve`` has one flag per field (``--max-n``, ...), made from these."""

    max_body_bytes: int = field(default=16 << 20, metadata={"help": "bytes of a request body"})
    max_image_bytes: int = field(default=8 << 20, metadata={"help": "bytes of one image, decoded from base64"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "width x height of one image"})
    max_images_per_request: int = field(default=4, metadata={"help": "images in one chat request"})
    max_n: int = field(default=10, metadata={"help": "images per /v1/images/generations request"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds per request"})
    allow_remote_images: bool = field(default=False, metadata={"help": "let image_url parts name http(s) URLs"})
    remote_fetch_timeout: float = field(default=5.0, metadata={"help": "seconds to fetch a remote image"})


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- request schemas
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields other OpenAI clients send and we do not use


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0)  # greedy unless asked: what `unitok chat` does
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    # extension: guidance of a picture the reply draws
    cfg_scale: float = Field(default=3.0, ge=0)
    logprobs: bool | None = None
    tools: list | None = None


class ImageRequest(_Lenient):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    # extensions (as vLLM's extra_body): sampling of every sub-code
    cfg_scale: float = Field(default=5.0, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


# ---------------------------------------------------------------------------- the server
class Server:
    """What the routes share: the engine, the limits, the model's name and counters for /metrics."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key: str | None = None):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.api_key = api_key
        self.created = int(time.time())
        self.requests = collections.Counter()  # (endpoint, status) -> count
        cfg = engine.model.config
        self.image_size = engine.unitok.config.image_size
        self.context = cfg.max_position_embeddings

    # ------------------------------------------------------------------ parsing
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def read_json(self, request) -> dict:
        body = await request.body()
        if len(body) > self.limits.max_body_bytes:
            raise APIError(413, f"request body is {len(body)} bytes, over the limit of {self.limits.max_body_bytes}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        return data

    def load_picture(self, url: str, where: str) -> torch.Tensor:
        from PIL import UnidentifiedImageError

        from tokenizer.image import image_pixels, open_image, preprocess_padded

        raw = self._image_bytes(url, where)
        if len(raw) > self.limits.max_image_bytes:
            raise APIError(413, f"{where}: image is {len(raw)} bytes, over the limit of {self.limits.max_image_bytes}",
                           param=where)
        try:
            pixels = image_pixels(io.BytesIO(raw))
            if isinstance(pixels, str) or pixels > self.limits.max_image_pixels:
                raise APIError(413, f"{where}: image has {pixels} pixels, over the limit of "
                                    f"{self.limits.max_image_pixels}", param=where)
            img = open_image(io.BytesIO(raw), where)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise APIError(400, f"{where}: cannot decode the image ({err})", param=where) from None
        return preprocess_padded(img, self.image_size)

    def _image_bytes(self, url: str, where: str) -> bytes:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header or not header[5:].startswith("image/"):
                raise APIError(400, f"{where}: a data URL must be data:image/<type>;base64,...", param=where)
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, f"{where}: the data URL's base64 payload is malformed", param=where) from None
        if url.startswith(("http://", "https://")):
            if not self.limits.allow_remote_images:
                raise APIError(400, f"{where}: remote image URLs are refused (start the server with "
                                    f"--allow-remote-images); send the image as a data: URL", param=where)
            return self._fetch(url, where)
        raise APIError(400, f"{where}: unsupported image URL scheme (use data: or http(s):)", param=where)

    def _fetch(self, url: str, where: str) -> bytes:
        import httpx

        limit = self.limits.max_image_bytes
        try:
            with httpx.stream("GET", url, timeout=self.limits.remote_fetch_timeout, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise APIError(400, f"{where}: fetching {url} gave HTTP {resp.status_code}", param=where)
                data = b""
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise APIError(413, f"{where}: image at {url} is over the limit of {limit} bytes",
                                       param=where)
                return data
        except httpx.HTTPError as err:
            raise APIError(400, f"{where}: cannot fetch {url} ({type(err).__name__}: {err})", param=where) from None

    def chat_request(self, body: ChatRequest) -> Request:
        from mllm.conversation import IMAGE_PLACEHOLDER
        from mllm.generation import ImageSampling, TextSampling

        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        proc = self.engine.processor
        messages, pictures = [], []
        for i, message in enumerate(body.messages):
            parts = message.content if isinstance(message.content, list) else [
                ContentPart(type="text", text=message.content or "")]
            text = ""
            for j, part in enumerate(parts):
                where = f"messages.{i}.content.{j}"
                if part.type == "text":
                    text += part.text or ""
                    continue
                if part.image_url is None:
                    raise APIError(400, f"{where}: an image_url part needs image_url.url", param=where)
                if len(pictures) == self.limits.max_images_per_request:
                    raise APIError(400, f"more than {self.limits.max_images_per_request} images in one request",
                                   param=where)
                pictures.append(self.load_picture(part.image_url.url, where))
                text += IMAGE_PLACEHOLDER + "\n"
            messages.append({"role": message.role, "content": text})
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "the last message must be the user's (or the system's)", param="messages")
        try:
            prompt = proc.chat_prompt(messages)
        except ValueError as err:
            raise APIError(400, f"messages: {err}", param="messages") from None
        room = self.context - len(prompt)
        asked = body.max_completion_tokens or body.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {len(prompt) + (asked or 1)} tokens ({len(prompt)} in the messages, "
                                f"{asked or 1} in the completion).", param="messages", code="context_length_exceeded")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            text = TextSampling(max_new_tokens=asked or room, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, stop_strings=tuple(s for s in stops if s))
            image = ImageSampling(cfg_scale=body.cfg_scale, temperature=1.0)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        return Request("chat", prompt, proc.generation_prompt(None, unconditional=True), text=text, image=image,
                       seed=_seed(body.seed), pixels=torch.stack(pictures) if pictures else None)

    def image_requests(self, body: ImageRequest) -> list[Request]:
        from mllm.generation import ImageSampling

        self.check_model(body.model)
        native = f"{self.image_size}x{self.image_size}"
        if body.size not in (None, "auto", native):
            raise APIError(400, f"size {body.size!r} is not supported; supported sizes: {native}", param="size")
        if body.n > self.limits.max_n:
            raise APIError(400, f"n={body.n} is over the maximum of {self.limits.max_n} images per request",
                           param="n")
        proc, cfg = self.engine.processor, self.engine.model.config
        prompt = proc.generation_prompt(body.prompt)
        room = self.context - cfg.image_positions
        if len(prompt) > room:
            raise APIError(400, f"prompt of {len(prompt)} tokens leaves no room for the image: at most {room} prompt "
                                f"tokens fit the model's context of {self.context}", param="prompt",
                           code="context_length_exceeded")
        try:
            sampling = ImageSampling(cfg_scale=body.cfg_scale, temperature=body.temperature, top_k=body.top_k,
                                     top_p=body.top_p)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        seed = _seed(body.seed)
        uncond = proc.generation_prompt(None, unconditional=True)
        return [Request("image", prompt, uncond, image=sampling, seed=seed + i) for i in range(body.n)]

    # ------------------------------------------------------------------ running
    def submit(self, request: Request) -> "EventStream":
        stream = EventStream(asyncio.get_running_loop())
        request.on_event = stream.put
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return stream

    def metrics(self) -> str:
        eng = self.engine
        lines = [
            "# HELP unitok_queue_depth Requests waiting for a place in the batch.",
            "# TYPE unitok_queue_depth gauge", f"unitok_queue_depth {eng.queue_depth}",
            "# HELP unitok_running_rows Rows (sequences) in the running batch.",
            "# TYPE unitok_running_rows gauge", f"unitok_running_rows {eng.running_rows}",
            "# HELP unitok_image_positions_total Image positions generated.",
            "# TYPE unitok_image_positions_total counter", f"unitok_image_positions_total {eng.image_positions.total}",
            "# HELP unitok_image_positions_per_second Image positions per second over the last 10 s.",
            "# TYPE unitok_image_positions_per_second gauge",
            f"unitok_image_positions_per_second {eng.image_positions.per_second():.3f}",
            "# HELP unitok_text_tokens_total Text tokens generated.",
            "# TYPE unitok_text_tokens_total counter", f"unitok_text_tokens_total {eng.text_tokens.total}",
            "# HELP unitok_text_tokens_per_second Text tokens per second over the last 10 s.",
            "# TYPE unitok_text_tokens_per_second gauge",
            f"unitok_text_tokens_per_second {eng.text_tokens.per_second():.3f}",
            "# HELP unitok_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE unitok_requests_total counter",
        ]
        lines += [f'unitok_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        return "\n".join(lines) + "\n"


def _seed(seed: int | None) -> int:
    return int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)


class EventStream:
    """The engine thread's events for one request, handed to the event loop that serves it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self, deadline: float, disconnected) -> Event:
        """The next event, or ``timeout`` when the deadline passed, or ``disconnected`` when the client left
        (polled every 0.25 s)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Event("timeout")
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=min(0.25, left))
            except asyncio.TimeoutError:
                if await disconnected():
                    return Event("disconnected")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (nothing is sent; logged as 499)."""


def _unfinished(server: "Server", event: Event, requests: list[Request]) -> APIError | ClientGone:
    """What to raise for a ``timeout`` or ``disconnected`` event, after cancelling the requests."""
    for r in requests:
        server.engine.cancel(r)
    if event.kind == "disconnected":
        return ClientGone()
    return APIError(504, f"the request did not finish within {server.limits.request_timeout:g} s",
                    kind="timeout_error")


def _png_url(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def create_app(server: Server, allowed_origins: list[str] | None = None):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

    app = FastAPI(title="unitok-mllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        path = request.url.path
        endpoint = path.rsplit("/", 1)[-1] or "root"
        error = None
        # vLLM's rule: the key guards /v1 (not /health, /metrics or the page); OPTIONS passes for CORS preflight
        if server.api_key and path.startswith("/v1") and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                error = APIError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                 kind="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if error is None and length and length.isdigit() and int(length) > server.limits.max_body_bytes:
            error = APIError(413, f"request body is {length} bytes, over the limit of "
                                  f"{server.limits.max_body_bytes}")
        if error is not None:
            server.requests[(endpoint, error.status)] += 1
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        response = await call_next(request)
        if path.startswith("/v1"):
            server.requests[(endpoint, response.status_code)] += 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request, err: ClientGone):
        from fastapi.responses import Response

        return Response(status_code=499)

    @app.get("/health")
    async def health():
        alive = server.engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def root():
        return RedirectResponse("/ui")

    @app.get("/ui")
    async def ui():
        return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "unitok"}]}

    def parse(model, data):
        try:
            return model.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = parse(ChatRequest, await server.read_json(http))
        server.check_model(body.model)
        request = await asyncio.to_thread(server.chat_request, body)  # decoding images off the event loop
        stream = server.submit(request)
        deadline = time.monotonic() + server.limits.request_timeout
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": server.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(server, request, stream, deadline, head, include_usage, http),
                                     media_type="text/event-stream")
        images, done = [], None
        while done is None:
            event = await stream.get(deadline, http.is_disconnected)
            if event.kind in ("timeout", "disconnected"):
                raise _unfinished(server, event, [request])
            if event.kind == "image":
                images.append(_png_url(event.png))
            elif event.kind == "error":
                raise APIError(500, event.text, kind="server_error")
            elif event.kind == "done":
                done = event
        message = {"role": "assistant", "content": done.text}
        if images:
            message["images"] = images
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": done.usage}

    @app.post("/v1/images/generations")
    async def images(http: HTTPRequest):
        body = parse(ImageRequest, await server.read_json(http))
        requests = server.image_requests(body)
        data, tokens, answered = [], 0, False
        try:  # anything short of an answer (queue full, timeout, client gone, engine error) cancels all n
            streams = [server.submit(r) for r in requests]
            deadline = time.monotonic() + server.limits.request_timeout
            for stream in streams:
                png = None
                while True:
                    event = await stream.get(deadline, http.is_disconnected)
                    if event.kind in ("timeout", "disconnected"):
                        raise _unfinished(server, event, requests)
                    if event.kind == "error":
                        raise APIError(500, event.text, kind="server_error")
                    if event.kind == "image":
                        png = event.png
                    if event.kind == "done":
                        tokens += event.usage["completion_tokens"]
                        break
                data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None})
            answered = True
        finally:
            if not answered:
                for r in requests:
                    server.engine.cancel(r)
        prompt_tokens = len(requests[0].prompt_ids)
        return {"created": int(time.time()), "data": data,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens,
                          "total_tokens": prompt_tokens + tokens}}

    return app


async def _sse(server: Server, request: Request, stream: EventStream, deadline: float, head: dict,
               include_usage: bool, http):
    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await stream.get(deadline, http.is_disconnected)
            if event.kind in ("timeout", "disconnected"):
                error = _unfinished(server, event, [request])
                if isinstance(error, APIError):
                    yield f"data: {json.dumps(error.body())}\n\n"
                break
            if event.kind == "text":
                yield chunk({"content": event.text})
            elif event.kind == "image":
                yield chunk({"images": [_png_url(event.png)]})
            elif event.kind == "error":
                yield f"data: {json.dumps(APIError(500, event.text, kind='server_error').body())}\n\n"
                break
            else:
                yield chunk({}, event.finish_reason)
                if include_usage:  # OpenAI's last chunk: no choices, the whole usage
                    last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": event.usage}
                    yield f"data: {json.dumps(last)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client left mid-stream: its rows leave the batch
        if request.finish_reason is None:
            server.engine.cancel(request)
