"""The package installs as a package: a wheel built from the checkout, installed into a fresh venv outside it, runs
`unitok --help` and the smoke demo from another folder (configs and recipes come from the package, never the
checkout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_runs_the_smoke_demo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("unitok_mllm-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # the dependencies (torch, transformers, ...) come from this environment through plain path lines: a .pth in
    # *its* site-packages (our editable install's finder) is not run from there, so the checkout stays out of reach
    (site / "dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([str(python), "-c", "import demo.pipeline, configs; print(demo.pipeline.__file__); "
                            "print(configs.ROOT)"], capture_output=True, text=True, check=True, cwd=work, env=env)
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), line  # the installed copy, not the checkout
    unitok = venv / "bin" / "unitok"
    assert "demo" in subprocess.run([str(unitok), "--help"], capture_output=True, text=True, check=True, cwd=work,
                                    env=env).stdout
    run = subprocess.run([str(unitok), "demo", "--size", "smoke", "--cache-dir", "demo"], capture_output=True,
                         text=True, cwd=work, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((work / "demo" / "results.json").read_text())
    assert set(results["stages"]) == {"tokenizer", "data", "pretrain", "instruct", "eval"}
    assert "VQA accuracy" in run.stdout
