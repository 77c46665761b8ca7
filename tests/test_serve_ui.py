"""`unitok serve` as a user starts it: after `unitok demo` (smoke size), with no model arguments, it serves the demo's
model to the official `openai` client; and the web UI at /ui works in headless Chromium (Debian's package, driven by
playwright) with every request to another host blocked: upload an image, ask, see the reply; generate, see the
pictures. Screenshots go to the test's folder, or to $UNITOK_SCREENSHOTS when set."""
from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mllm_train_helpers import REPO, free_port, write_tiny_pair

pytestmark = pytest.mark.slow


def start_cli(args: list[str], cwd: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "unitok_cli", "serve", "--port", str(port), *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"unitok serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("unitok serve did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_serve_with_no_arguments_serves_the_demo_model(tmp_path):
    import openai

    import unitok_cli

    assert unitok_cli.main(["demo", "--size", "smoke", "--cache-dir", str(tmp_path / "runs" / "demo")]) == 0
    port = free_port()
    server = start_cli([], tmp_path, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["instruct"]
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = client.chat.completions.create(model="instruct", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What color is the object?"}]}])
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.prompt_tokens > 16
        result = client.images.generate(model="instruct", prompt="a red circle", n=2, size="64x64",
                                        extra_body={"seed": 0})
        assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in result.data] == [(64, 64)] * 2
    finally:
        stop(server)
    missing = subprocess.run([sys.executable, "-m", "unitok_cli", "serve"], cwd=tmp_path / "runs", text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert missing.returncode == 2 and "run `unitok demo` first" in missing.stderr


def test_the_web_ui_in_a_real_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    pair = write_tiny_pair(tmp_path / "pair", spread=2.0)
    port = free_port()
    server = start_cli(["--model", str(pair / "mllm"), "--tokenizer", str(pair / "unitok")], tmp_path, port)
    shots = Path(os.environ.get("UNITOK_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    picture = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    outside = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page()

            def only_local(route):
                if route.request.url.startswith(f"http://127.0.0.1:{port}/") or route.request.url.startswith("data:"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", only_local)
            page.goto(f"http://127.0.0.1:{port}/")  # redirects to /ui
            page.wait_for_function("document.getElementById('model').textContent.length > 0")
            assert page.locator("#model").inner_text() == "mllm"

            page.set_input_files("#upload", str(picture))
            page.fill("#question", "what colour is it")
            page.click("#send")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelectorAll('.msg.assistant').length === 1", timeout=60_000)
            assert page.locator(".msg.user img").count() == 1  # the upload is shown in the conversation
            answer = page.locator(".msg.assistant").inner_text()
            assert answer.startswith("assistant: ") and len(answer) > len("assistant: ")
            assert page.locator(".msg.error").count() == 0
            page.screenshot(path=str(shots / "ui-chat.png"), full_page=True)

            page.click("#tab-draw")
            page.fill("#prompt", "a red circle")
            page.fill("#n", "3")
            page.fill("#seed", "7")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery img').length === 3 && "
                                   "[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 64)",
                                   timeout=60_000)
            page.screenshot(path=str(shots / "ui-draw.png"), full_page=True)
            first = page.locator("#gallery img").first.get_attribute("src")

            page.fill("#n", "50")  # over the limit: the page shows the server's message, not a dead button
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.includes('maximum')")
            assert page.locator("#gallery img").first.get_attribute("src") == first
            browser.close()
    finally:
        stop(server)
    assert outside == []  # the page works with no network
    assert (shots / "ui-chat.png").stat().st_size > 1000 and (shots / "ui-draw.png").stat().st_size > 1000
