"""DeepSpeed ZeRO-2 and ZeRO-3 through the project's launcher path (accelerate launch, 2 CPU processes, gloo):
per-step losses equal a 1-process run with the same global batch (2 micro-batches of one sample), and the log and the
checkpoint prove that two ranks ran under DeepSpeed (the failure modes of CPU launches are silent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mllm_train_helpers import REPO, losses, make_data, run_cli, write_recipe

STEPS = 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    files = make_data(root / "data", n=32)
    data = {"batching": "pad", "batch_size": 1, "cfg_dropout": 0.0,
            "sources": [{"name": "pairs", "kind": "t2i", "paths": [str(files["pairs"])]}]}
    ref = write_recipe(root, files, root / "ref", data=data, train={"steps": STEPS, "grad_accum": 2})
    run_cli("train", "--config", str(ref), env={"OMP_NUM_THREADS": "1"})
    return root, files, data, losses(root / "ref")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_ranks_match_one_process(setup, stage):
    root, files, data, reference = setup
    ds_config = REPO / "configs" / "deepspeed" / f"{stage}.json"
    out = root / stage
    recipe = write_recipe(root, files, out, data=data,
                          train={"steps": STEPS, "grad_accum": 1, "deepspeed": str(ds_config), "save_every": 2})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(ds_config), "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "unitok_cli", "train", "--config", str(recipe)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "processes 2 (DistributedType.DEEPSPEED)" in proc.stderr
    meta = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - reference[step]) <= 2e-5 * max(1.0, abs(reference[step])), (step, got, reference)
    assert reference[STEPS] < reference[1]  # it trained
    assert (out / "final" / "model.safetensors").is_file()
