"""`mixed_precision: auto` follows the hardware: bf16 autocast only where the CPU runs bf16 natively and faster than
fp32 (the probe's answer decides), fp32 where bf16 is emulated; an explicit bf16 there still runs, after one warning
with the measured ratio; accelerate's own word `no` is accepted from YAML and the command line."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from train.common import precision as P
from train.common.config import ConfigError
from train.mllm.config import MLLMTrainConfig
from train.tokenizer.config import TokenizerTrainConfig

NATIVE = P.MatmulSpeed(fp32_gflops=180.0, bf16_gflops=400.0)  # a Xeon with AMX, 2 threads
EMULATED = P.MatmulSpeed(fp32_gflops=34.0, bf16_gflops=0.8)  # an AVX2-only AMD EPYC, 2 threads


@pytest.fixture
def cpu_answer(monkeypatch):
    """Force the probe's answer (and a CPU-only torch) for one test."""
    def force(speed: P.MatmulSpeed) -> None:
        monkeypatch.setattr(P, "probe", lambda: speed)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(P, "_warned", set())
    return force


def test_auto_is_bf16_on_a_native_cpu_and_fp32_where_bf16_is_emulated(cpu_answer):
    cpu_answer(NATIVE)
    precision, why = P.resolve_precision("auto")
    assert precision == "bf16" and "natively" in why and "400.0 GFLOP/s against 180.0" in why
    cpu_answer(EMULATED)
    precision, why = P.resolve_precision("auto")
    assert precision == "no" and "emulates bf16" in why and "0.8 GFLOP/s against 34.0" in why
    assert P.resolve_precision("no") == ("no", "fp32, as the recipe asks (mixed_precision: no)")


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once_with_the_ratio(cpu_answer):
    cpu_answer(EMULATED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert P.resolve_precision("bf16")[0] == "bf16"
        assert P.resolve_precision("bf16")[0] == "bf16"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "42x slower" in messages[0] and "auto would choose fp32" in messages[0]
    cpu_answer(NATIVE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert P.resolve_precision("bf16")[0] == "bf16"
    assert not caught


def test_both_trainers_log_the_precision_they_chose_and_why(cpu_answer, caplog):
    from train.mllm.trainer import build_accelerator as mllm_accelerator
    from train.tokenizer.trainer import build_accelerator as tokenizer_accelerator

    cpu_answer(EMULATED)
    with caplog.at_level(logging.INFO, logger="unitok.precision"):
        tok = tokenizer_accelerator(TokenizerTrainConfig.load(None, ["train.mixed_precision=auto"]))
        assert tok.mixed_precision == "no"
        cpu_answer(NATIVE)
        mllm = mllm_accelerator(MLLMTrainConfig.load(None, ["train.mixed_precision=auto"]))
        # a run of its own: the earlier fp32 accelerator in this process does not hold this one to fp32
        assert mllm.mixed_precision == "bf16"
        ds = MLLMTrainConfig.load(None, ["train.mixed_precision=auto", "train.deepspeed=configs/deepspeed/zero2.json"])
        from train.mllm.trainer import mllm_precision
        assert mllm_precision(ds) == ("no", "auto: DeepSpeed on a CPU trains in fp32 (its bf16 mode casts the weights)")
    assert [r.getMessage() for r in caplog.records] == [
        "tokenizer training precision: fp32 - auto: this CPU emulates bf16 (bf16 0.8 GFLOP/s against 34.0 for "
        "fp32), so fp32",
        "MLLM training precision: bf16 autocast - auto: this CPU runs bf16 natively (bf16 400.0 GFLOP/s against "
        "180.0 for fp32)"]


@pytest.mark.parametrize("cls", [MLLMTrainConfig, TokenizerTrainConfig])
def test_no_is_accepted_as_accelerates_word_for_fp32(cls, tmp_path):
    assert cls.load(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert cls.load(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="must be one of 'auto', 'no', 'bf16', got True"):
        cls.load(None, ["train.mixed_precision=yes"])


def test_the_probe_measures_once_per_process_and_thread_count():
    P._measured.cache_clear()
    first = P.probe()
    assert first is P.probe()  # cached: the decision costs one sub-second probe per process
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0
    assert first.bf16_native == (first.bf16_gflops > first.fp32_gflops)
    info = P.machine_info()
    assert (info.fp32_gflops, info.bf16_gflops, info.threads) == (first.fp32_gflops, first.bf16_gflops,
                                                                   torch.get_num_threads())
