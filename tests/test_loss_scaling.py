"""Global-token loss normalisation and every-submodule-every-step, through ``MLLMTrainer.train_step``:

* the same global batch gives the same gradient split 1x4, 2x2 and 4x1 (micro-batch x accumulation) and over 1 or 2
  DDP processes: every supervised item (text token or image sub-code) weighs the same;
* under DDP without an unused-parameter search and under ZeRO-3, a rank whose micro-batches are text-only steps with a
  rank whose micro-batches carry images (weight-0 passes keep every rank's submodules in step), with the losses of
  one process seeing the same samples.

The samples are fixed per rank by ``tests/train_probe.py`` (mixed kinds: the per-micro-batch means of old would weigh
a 16-token caption like a 128-sub-code image)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mllm_train_helpers import REPO, free_port, make_data, write_recipe

pytestmark = pytest.mark.slow
PROBE = REPO / "tests" / "train_probe.py"
GLOBAL = [["i2t", 0], ["t2i", 0], ["text", 0], ["i2t", 1]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    return root, make_data(root / "data", n=32)


def _probe(root, files, name, grad_accum, ranks, launcher=(sys.executable,), deepspeed=None):
    train = {"grad_accum": grad_accum, "steps": 100}
    if deepspeed:
        train["deepspeed"] = str(REPO / "configs" / "deepspeed" / f"{deepspeed}.json")
    recipe = write_recipe(root, files, root / name, train=train, optim={"grad_clip": 0.0, "warmup_steps": 0},
                          data={"batching": "pad", "cfg_dropout": 0.0})
    plan = root / f"plan-{name}.json"
    plan.write_text(json.dumps({"ranks": ranks}))
    out = root / f"probe-{name}"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    if "torch.distributed.run" in launcher:
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run([*launcher, str(PROBE), str(recipe), str(plan), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    grads = None
    if (out / "grads.safetensors").is_file():
        from safetensors.torch import load_file

        grads = load_file(str(out / "grads.safetensors"))
    return metrics, grads


def _torchrun(n: int) -> list[str]:
    """Plain DDP over gloo (accelerate reads the torchrun environment; ACCELERATE_USE_CPU makes it multi-CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(free_port())]


def _ds_launch(stage: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
            str(REPO / "configs" / "deepspeed" / f"{stage}.json"), "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def _assert_same_grads(got, ref, what):
    assert got.keys() == ref.keys() and len(ref) > 10, what
    for name, g in ref.items():
        diff = (got[name] - g).norm().item()
        assert diff <= 1e-5 * g.norm().item() + 1e-9, (what, name, diff, g.norm().item())


def test_the_same_global_batch_gives_the_same_gradient_however_it_is_split(data):
    root, files = data
    splits = {"1x4": (4, [[[[s] for s in GLOBAL]]]),
              "2x2": (2, [[[GLOBAL[:2], GLOBAL[2:]]]]),
              "4x1": (1, [[[GLOBAL]]])}
    results = {name: _probe(root, files, name, accum, ranks) for name, (accum, ranks) in splits.items()}
    ddp = _probe(root, files, "ddp-1x2", 2, [[[[GLOBAL[0]], [GLOBAL[1]]]], [[[GLOBAL[2]], [GLOBAL[3]]]]],
                 launcher=_torchrun(2))
    ref_metrics, ref = results["4x1"]
    m = ref_metrics[0]
    assert m["text_targets"] > 0 and m["image_targets"] > 0  # mixed: the weighting matters
    for name, (metrics, grads) in {**results, "2 processes, 1x2 each": ddp}.items():
        _assert_same_grads(grads, ref, name)
        assert abs(metrics[0]["loss"] - m["loss"]) <= 1e-6 * abs(m["loss"]), (name, metrics[0]["loss"], m["loss"])
        assert metrics[0]["text_targets"] == m["text_targets"] and metrics[0]["image_targets"] == m["image_targets"]


MIXED_STEPS = 3


def _text_rank_image_rank():
    """Rank 0 only ever gets text-only samples; rank 1 gets text-to-image and image-to-text samples."""
    text = [[[["text", 2 * s]], [["text", 2 * s + 1]]] for s in range(MIXED_STEPS)]
    images = [[[["t2i", s]], [["i2t", s]]] for s in range(MIXED_STEPS)]
    return text, images


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_a_text_only_rank_steps_with_an_image_rank(data, backend):
    root, files = data
    text, images = _text_rank_image_rank()
    # one process, the same samples: both ranks' micro-batches accumulated
    one = [[text[s][0], text[s][1], images[s][0], images[s][1]] for s in range(MIXED_STEPS)]
    ref_metrics, ref_grads = _probe(root, files, f"mixed-one-{backend}", 4, [one])
    if backend == "ddp":
        metrics, grads = _probe(root, files, "mixed-ddp", 2, [text, images], launcher=_torchrun(2))
        _assert_same_grads(grads, ref_grads, "ddp")
    else:
        metrics, _ = _probe(root, files, "mixed-zero3", 2, [text, images], launcher=_ds_launch("zero3"),
                            deepspeed="zero3")
    assert len(metrics) == MIXED_STEPS
    for got, want in zip(metrics, ref_metrics):
        assert abs(got["loss"] - want["loss"]) <= 2e-5 * abs(want["loss"]), (got["loss"], want["loss"])
        assert got["text_targets"] == want["text_targets"] and got["image_targets"] == want["image_targets"]
    assert ref_metrics[-1]["loss"] != ref_metrics[0]["loss"]  # it trained between steps
