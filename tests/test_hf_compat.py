"""The transformers seam (``mllm/hf_compat.py``): our code paths use no deprecated transformers API, the cache is
found by ``generate`` under this version's name, and bf16 loading keeps the frozen quantiser codebooks in fp32."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaModel

from hf_smoke import deprecations_are_errors, run
from mllm import UniTokMLLM, UniTokMLLMConfig
from mllm import hf_compat as hf


def test_every_path_runs_without_a_transformers_deprecation(tmp_path):
    steps = run(tmp_path)
    assert len(steps) == 6, steps


def test_the_deprecation_guard_catches_a_legacy_cache_kwarg():
    """The guard must be able to fail: on transformers >= 5.24 the old name is a deprecation."""
    if hf.CACHE == "past_key_values":
        pytest.skip("this transformers still takes past_key_values as the current name")
    model = LlamaModel(UniTokMLLMConfig.from_preset("tiny", num_hidden_layers=1)).eval()
    with pytest.raises(AssertionError, match="deprecated API used on our code path"):
        with deprecations_are_errors():
            model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=None, use_cache=False)


def test_cache_name_follows_llama_forward():
    assert hf.CACHE in inspect.signature(LlamaModel.forward).parameters
    model = UniTokMLLM(UniTokMLLMConfig.from_preset("tiny", num_hidden_layers=1)).eval()
    out = model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True, cache=hf.new_dynamic_cache(model.config))
    assert hf.CACHE in out and hf.cache_of(out).get_seq_length() == 3  # where generate looks for it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[3]]), use_cache=True,
                     cache=hf.cache_of(out))
    assert hf.cache_of(step).get_seq_length() == 4


def test_bf16_load_keeps_the_quantiser_codebooks_fp32(tmp_path):
    torch.manual_seed(0)
    model = UniTokMLLM(UniTokMLLMConfig.from_preset("tiny", num_hidden_layers=1))
    book = model.code_embedder.quantizer.codebooks[0].codebook.weight
    with torch.no_grad():
        book.copy_(torch.randn_like(book) * 0.3 + 1e-3)  # values that bf16 would round
    model.save_pretrained(tmp_path)
    loaded = UniTokMLLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for b_loaded, b_saved in zip(loaded.code_embedder.quantizer.codebooks, model.code_embedder.quantizer.codebooks):
        assert b_loaded.codebook.weight.dtype == torch.float32
        assert torch.equal(b_loaded.codebook.weight, b_saved.codebook.weight)
    codes = torch.randint(0, model.config.codebook_size, (1, model.config.num_codebooks, model.config.image_positions))
    assert torch.equal(loaded.code_embedder.lookup(codes), model.code_embedder.lookup(codes))
