"""The lmms-eval plugin (eval/lmms_plugin.py) through lmms-eval's own evaluator, offline, on a local task with a few
images: `--model unitok_mllm` is found through our entry point, its answers are the library's greedy chat answers in
request order, and loglikelihood says a greedy answer is greedy. lmms-eval lives outside our venv (it pins
torchvision): the test runs where $UNITOK_LMMS_EVAL_PATH names a folder holding it (.ci/run builds one from
.ci/lmms-eval-deps.txt) and skips otherwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_train_helpers import REPO, write_tiny_pair

LMMS = os.environ.get("UNITOK_LMMS_EVAL_PATH")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (LMMS and (Path(LMMS) / "lmms_eval").is_dir()),
                                 reason="lmms-eval not installed: set UNITOK_LMMS_EVAL_PATH (.ci/lmms-eval-deps.txt)")]

TASK = """\
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}"}}
task: unitok_local
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
"""

DRIVER = """\
import json, sys
from types import SimpleNamespace

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

root, pair = sys.argv[1], sys.argv[2]
out = simple_evaluate(model="unitok_mllm", model_args=f"pretrained={pair}/mllm,tokenizer={pair}/unitok",
                      tasks=["unitok_local"], task_manager=TaskManager(include_path=f"{root}/task"), batch_size=2,
                      log_samples=True, limit=None)
samples = sorted(out["samples"]["unitok_local"], key=lambda s: s["doc_id"])
answers = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]

# loglikelihood through the same adapter class the registry resolved
from lmms_eval.models import get_model
model = get_model("unitok_mllm").create_from_arg_string(f"pretrained={pair}/mllm,tokenizer={pair}/unitok")
docs = [json.loads(line) for line in open(f"{root}/data.jsonl")]
model.task_dict = {"t": {"test": docs}}
visual = lambda doc: [__import__("PIL.Image").Image.open(doc["image"]).convert("RGB")]
ll = model.loglikelihood([SimpleNamespace(args=(docs[0]["question"], answers[0], visual, 0, "t", "test")),
                          SimpleNamespace(args=(docs[0]["question"], answers[0] + " zz", visual, 0, "t", "test"))])
print("RESULT " + json.dumps({"answers": answers, "exact": out["results"]["unitok_local"]["exact,none"],
                              "loglikelihood": ll}))
"""


def test_lmms_eval_runs_the_plugin_on_a_local_task(tmp_path):
    pair = write_tiny_pair(tmp_path / "pair", spread=2.0)
    docs = []
    for i in range(5):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        docs.append({"question": ["what colour is it", "how many circle", "is it on the left"][i % 3],
                     "image": str(path), "answer": "red"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "unitok_local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    (tmp_path / "task" / "utils.py").write_text(UTILS)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([LMMS, str(REPO)]), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(pair)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])

    from mllm.cli import load_mllm, load_unitok
    from mllm.generation import TextSampling, chat
    from tokenizer.image import load_image, preprocess_padded

    model, processor = load_mllm(str(pair / "mllm"))
    unitok = load_unitok(str(pair / "unitok"), model, model.device)
    expected = []
    for d in docs:
        codes = unitok.encode(preprocess_padded(load_image(d["image"]), 64)[None])
        expected.append(chat(model, processor, [{"role": "user", "content": "<image>\n" + d["question"]}], codes,
                             TextSampling(max_new_tokens=6)))
    assert result["answers"] == expected and any(expected)  # batched through lmms-eval, in request order
    assert result["exact"] == sum(a == "red" for a in expected) / len(expected)
    # loglikelihood: the continuation's summed log-probability after the prompt, and whether argmax gives it
    import torch

    codes = unitok.encode(preprocess_padded(load_image(docs[0]["image"]), 64)[None])
    prompt = processor.chat_prompt([{"role": "user", "content": "<image>\n" + docs[0]["question"]}])
    for continuation, (lp, greedy) in zip((expected[0], expected[0] + " zz"), result["loglikelihood"]):
        target = processor.tokenizer(continuation, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target]), image_codes=codes).logits[0, len(prompt) - 1:-1]
        logprobs = logits.float().log_softmax(-1)
        assert lp == pytest.approx(float(logprobs.gather(-1, torch.tensor(target)[:, None]).sum()), rel=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(target)).all())
    assert not result["loglikelihood"][1][1]  # " zz" is not what the model says
