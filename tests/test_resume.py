"""Exact resume: a training process killed with SIGKILL and resumed from its last checkpoint logs exactly the
losses an uninterrupted run logs (bitwise on CPU): model, optimiser, scheduler, RNG and data position restored.
The kill comes from deterministic fault injection (``UNITOK_FAULT_KILL_AFTER_STEP``), not a timed poll."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch

from mllm_train_helpers import REPO, losses, make_data, run_cli, unitok_cmd, write_recipe
from train.common.checkpoint import FAULT_ENV, write_manifest

pytestmark = pytest.mark.slow


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    data = make_data(tmp_path / "data")
    steps = dict(steps=12, save_every=4, keep_last=2)
    # dropout and a non-trivial schedule make the RNG and scheduler state matter
    ref_recipe = write_recipe(tmp_path, data, tmp_path / "ref", train=steps, data={"cfg_dropout": 0.3})
    run_cli("train", "--config", str(ref_recipe))
    reference = losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 13))

    recipe = write_recipe(tmp_path, data, tmp_path / "run", train=steps, data={"cfg_dropout": 0.3})
    proc = subprocess.run(unitok_cmd("train", "--config", str(recipe)), cwd=REPO, capture_output=True, timeout=300,
                          env={**os.environ, FAULT_ENV: "6"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))  # killed after step 6: steps 5-6 are lost work
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004"]

    run_cli("train", "--config", str(recipe), "--resume")
    resumed = losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000012"]  # keep_last=2, no temporary leftovers

    # a checkpoint of 2 processes resumed by 1: refused before anything is built or written, saying what to do
    meta = tmp_path / "run" / "checkpoints" / "step-00000012" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))
    write_manifest(meta.parent)  # as that run would have written it (else the edit reads as damage)
    before = _tree(tmp_path / "run")
    proc = subprocess.run(unitok_cmd("train", "--config", str(recipe), "train.steps=16", "--resume"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "written by 2 processes, this run has 1" in proc.stderr and "--num_processes 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(tmp_path / "run") == before


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run SIGKILLed after step 6 of 8 (checkpoints at steps 4 and 6), the uninterrupted run's losses, and
    ``fresh()``, which puts the killed run back as it was left (each test damages its own copy in place)."""
    root = tmp_path_factory.mktemp("killed")
    data = make_data(root / "data")
    steps = dict(steps=8, save_every=2, keep_last=2)
    run_cli("train", "--config", str(write_recipe(root, data, root / "ref", train=steps, data={"cfg_dropout": 0.3})))
    recipe = write_recipe(root, data, root / "run", train=steps, data={"cfg_dropout": 0.3})
    proc = subprocess.run(unitok_cmd("train", "--config", str(recipe)), cwd=REPO, capture_output=True, timeout=300,
                          env={**os.environ, FAULT_ENV: "6"})
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    shutil.copytree(root / "run", root / "as-killed")

    def fresh():
        shutil.rmtree(root / "run")
        shutil.copytree(root / "as-killed", root / "run")
        return root / "run"

    return SimpleNamespace(reference=losses(root / "ref"), recipe=recipe, fresh=fresh)


@pytest.mark.parametrize("victim", ["accelerate/model.safetensors", "accelerate/optimizer.bin",
                                    "accelerate/scheduler.bin", "accelerate/random_states_0.pkl", "rank00000.pt",
                                    "meta.json"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(killed_run, victim):
    """Every state file of a checkpoint, damaged after it was written (here: truncated; accelerate alone would fail
    on the weights with no file named, and skip an unreadable RNG file silently), makes resume fall back to the
    previous checkpoint, say so, and still log the uninterrupted run's losses bitwise."""
    run = killed_run.fresh()
    f = run / "checkpoints" / "step-00000006" / victim
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    older = _tree(run / "checkpoints" / "step-00000004")

    proc = run_cli("train", "--config", str(killed_run.recipe), "--resume")
    assert f"skipping damaged checkpoint step-00000006 ({victim} has" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000004 at step 4" in proc.stderr
    resumed = losses(run)
    assert [resumed[s] for s in range(1, 9)] == [killed_run.reference[s] for s in range(1, 9)]
    assert not (run / "checkpoints" / "step-00000004").exists() or \
        _tree(run / "checkpoints" / "step-00000004") == older


def test_snapshots_are_the_model_at_their_step_and_leave_training_unchanged(tmp_path):
    """``train.snapshot_every`` (the demo's learning curves) exports the model every N steps: each snapshot holds the
    weights the checkpoint of that step holds, and a run with snapshots trains exactly as one without."""
    from safetensors.torch import load_file

    from train.mllm.config import MLLMTrainConfig
    from train.mllm.trainer import snapshots, train

    data = make_data(tmp_path / "data")
    runs = {}
    for name, every in (("plain", 0), ("snap", 2)):
        recipe = write_recipe(tmp_path, data, tmp_path / name, train=dict(steps=5, save_every=2, keep_last=3,
                                                                          snapshot_every=every))
        runs[name] = [h["loss"] for h in train(MLLMTrainConfig.load(recipe))]
    assert runs["snap"] == runs["plain"]
    final = {n: load_file(tmp_path / n / "final" / "model.safetensors") for n in runs}
    assert final["snap"].keys() == final["plain"].keys()
    assert all(torch.equal(final["snap"][k], final["plain"][k]) for k in final["plain"])

    found = snapshots(tmp_path / "snap")
    assert [step for step, _ in found] == [2, 4]  # step 5 is the final export
    assert snapshots(tmp_path / "plain") == []
    for step, folder in found:
        snap = load_file(folder / "model.safetensors")
        at_step = load_file(tmp_path / "snap" / "checkpoints" / f"step-{step:08d}" / "accelerate" / "model.safetensors")
        assert snap.keys() == at_step.keys()
        assert all(torch.equal(snap[k], at_step[k]) for k in snap)
        assert any(not torch.equal(snap[k], final["snap"][k]) for k in snap)  # not the final weights
