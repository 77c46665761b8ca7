"""Exact resume: a training process killed with SIGKILL and resumed from its last checkpoint logs exactly the
losses an uninterrupted run logs (bitwise on CPU): model, optimiser, scheduler, RNG and data position restored."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from mllm_train_helpers import REPO, losses, make_data, run_cli, unitok_cmd, write_recipe


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    data = make_data(tmp_path / "data")
    steps = dict(steps=12, save_every=4, keep_last=2)
    # dropout and a non-trivial schedule make the RNG and scheduler state matter
    ref_recipe = write_recipe(tmp_path, data, tmp_path / "ref", train=steps, data={"cfg_dropout": 0.3})
    run_cli("train", "--config", str(ref_recipe))
    reference = losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 13))

    recipe = write_recipe(tmp_path, data, tmp_path / "run", train=steps, data={"cfg_dropout": 0.3})
    proc = subprocess.Popen(unitok_cmd("train", "--config", str(recipe)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        done = losses(tmp_path / "run") if metrics.is_file() else {}
        if (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir() and done and max(done) >= 5:
            proc.send_signal(signal.SIGKILL)
            killed_after = max(done)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, "training was not killed mid-run"
    assert killed_after < 12

    run_cli("train", "--config", str(recipe), "--resume")
    resumed = losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000012"]  # keep_last=2, no temporary leftovers
