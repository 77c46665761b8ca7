"""Load on `unitok serve`: concurrent clients send mixed requests through the official `openai` client.

    python benchmarks/bench_serve.py [--model DIR --tokenizer PATH | --url URL] [--clients 32] [--requests 200]

Without ``--url`` it starts the server in this process over ``--model`` / ``--tokenizer`` (default: the model
``unitok demo`` trained). The mix is a third each of chat about an image, text-only chat and text-to-image. It
prints the errors (target 0), p50 / p95 latency per kind, the throughput, and images per second with batching (all
image requests at once) against one request at a time, side by side.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("chat+image", "chat", "image")


def picture_url(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(client, model: str, kind: str, i: int, max_tokens: int) -> None:
    if kind == "image":
        out = client.images.generate(model=model, prompt="a red circle on the left", n=1,
                                     extra_body={"seed": i, "cfg_scale": 3.0})
        if not out.data or not out.data[0].b64_json:
            raise RuntimeError("no image in the response")
        return
    content = "what colour is the circle?" if kind == "chat" else [
        {"type": "image_url", "image_url": {"url": picture_url(i)}},
        {"type": "text", "text": "what colour is the circle?"}]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                         max_tokens=max_tokens, seed=i)
    if out.choices[0].message.content is None:
        raise RuntimeError("no content in the response")


def run_load(base_url: str, clients: int, requests: int, api_key: str = "none", max_tokens: int = 16,
             kinds: tuple[str, ...] = KINDS) -> dict:
    """``requests`` mixed requests from ``clients`` threads; returns errors, latencies per kind and the wall time."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    latencies = {k: [] for k in kinds}
    errors: list[str] = []
    lock = threading.Lock()

    def job(i: int) -> None:
        kind = kinds[i % len(kinds)]
        start = time.perf_counter()
        try:
            one_request(client, model, kind, i, max_tokens)
        except Exception as err:  # counted, never fatal: the figure is how many there are
            with lock:
                errors.append(f"{kind}: {type(err).__name__}: {err}")
            return
        with lock:
            latencies[kind].append(time.perf_counter() - start)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(job, range(requests)))
    return {"errors": errors, "latencies": latencies, "wall": time.perf_counter() - start, "requests": requests}


def images_per_second(base_url: str, n: int, clients: int, api_key: str = "none") -> float:
    result = run_load(base_url, clients, n, api_key, kinds=("image",))
    if result["errors"]:
        raise RuntimeError(f"{len(result['errors'])} image requests failed: {result['errors'][0]}")
    return n / result["wall"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(load: dict, serial: float | None = None, batched: float | None = None) -> str:
    lines = [f"requests: {load['requests']}, errors: {len(load['errors'])}, wall {load['wall']:.1f} s, "
             f"throughput {load['requests'] / load['wall']:.2f} requests/s"]
    lines.append(f"{'kind':<12} {'n':>4} {'p50 s':>8} {'p95 s':>8}")
    for kind, values in load["latencies"].items():
        lines.append(f"{kind:<12} {len(values):>4} {percentile(values, 50):>8.2f} {percentile(values, 95):>8.2f}")
    if serial is not None and batched is not None:
        lines.append(f"images/s one request at a time: {serial:.2f}   batched: {batched:.2f}   "
                     f"ratio {batched / serial:.2f}x")
    for err in load["errors"][:5]:
        lines.append(f"  error: {err}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--model", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--api-key", default="none")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--images", type=int, default=16, help="image requests for the batched-vs-serial figure")
    args = p.parse_args()

    url, stop = args.url, None
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import socket

        import uvicorn

        from serve.api import create_app
        from serve.cli import add_arguments, build_server

        sp = argparse.ArgumentParser()
        add_arguments(sp)
        served = ["--max-batch-rows", str(args.max_batch_rows), "--max-queue", str(4 * args.clients)]
        served += ["--model", args.model] if args.model else []
        served += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        server = build_server(sp.parse_args(served))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=uv.run, daemon=True).start()
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        stop = uv
    load = run_load(url, args.clients, args.requests, args.api_key, args.max_tokens)
    serial = images_per_second(url, max(2, args.images // 4), 1, args.api_key)
    batched = images_per_second(url, args.images, args.images, args.api_key)
    print(report(load, serial, batched))
    if stop is not None:
        stop.should_exit = True
    return 1 if load["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
