"""unitok-mllm: a unified autoregressive multimodal LLM built on the UniTok tokenizer."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="unitok-mllm",
    version="0.1.0",
    description="UniTok multi-codebook tokenizer + unified autoregressive MLLM: train, chat, generate, evaluate",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # layers, bottom up: tokenizer, mllm (the models) < shapes, metrics (the toy world, the metric networks and
    # GenEval's rules) < train, eval (never importing each other) < demo, serve (applications); configs is data
    packages=find_packages(include=["tokenizer*", "mllm*", "shapes*", "metrics*", "train*", "eval*", "demo*",
                                    "serve*", "configs*"]),
    py_modules=["unitok_cli"],
    package_data={"configs": ["tokenizer/*.yaml", "recipes/*.yaml", "deepspeed/*.json"], "serve": ["*.html"]},
    # Supported ranges. transformers moves fast (5.24 renamed the KV-cache kwarg), so its range lists only tested
    # releases; the floors of the others are the versions we test. constraints.txt pins the exact tested set (the
    # README and CI install with it); .ci/run also smoke-tests the newest releases and warns when one breaks us.
    # torch is never pinned here, so a CUDA machine keeps its own build (constraints-cpu.txt pins the CPU wheel).
    # torchvision/timm/open_clip are deliberately absent (see README).
    install_requires=[
        "torch>=2.13",  # tested: 2.13.0 (SDPA enable_gqa needs >= 2.5)
        "transformers>=5.23.0,<=5.25.0",  # tested: 5.23.0, 5.24.0, 5.25.0 (internals in mllm/hf_compat.py)
        "accelerate>=1.15",
        "deepspeed>=0.19.8",
        "peft>=0.21.2",
        "datasets>=5.2",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "webdataset>=0.2.100",
        "tensorboard>=2.16",
        "scipy>=1.11",
        "fastapi>=0.115",  # unitok serve (+ uvicorn); tested: fastapi 0.165.0, uvicorn 0.55.0
        "uvicorn>=0.30",
        "httpx>=0.27",  # unitok serve fetches http(s) image URLs when allowed
    ],
    extras_require={
        # the serving tests drive the server with the official openai client and the web UI with playwright
        # (on Debian's chromium: apt-get install chromium; .ci/run installs it)
        "dev": ["pytest>=8", "openai>=1.50", "playwright>=1.45"],
        # CUDA machines only: pip install --no-build-isolation -e ".[gpu]" after torch.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["unitok=unitok_cli:main"],
                  # lmms-eval finds `--model unitok_mllm` here (lmms-eval >= 0.6; installed without its deps)
                  "lmms_eval.models": ["unitok_mllm=eval.lmms_plugin:manifest"]},
)
