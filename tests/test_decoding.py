"""The static image decoder (mllm.decoding): the same codes as the growing-cache loop, in fp32, with and without
guidance, sampled with seeded generators, compiled or not; fused projections bit-identical to separate ones; the
range check once per request; a decoder reused across calls and after the weights change."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mllm import UniTokMLLM
from mllm.decoding import LayerStack, StaticImageDecoder
from mllm.generation import ImageSampling, generate_image_codes, generate_image_codes_growing, left_pad

from test_mllm import small_config, spread_weights


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = spread_weights(UniTokMLLM(small_config()))
    torch.manual_seed(1)
    gqa_positioned = spread_weights(UniTokMLLM(small_config(num_key_value_heads=1, image_position_embedding=True)),
                                    seed=1)
    return {"plain": plain, "gqa+positions": gqa_positioned}


def prompts(guided: bool, rows: int = 2):
    conds = [[1, 10, 11, 12, 13, 3], [1, 20, 3], [1, 40, 41, 3]][:rows]  # left padding on the shorter rows
    return left_pad(conds + ([[1, 30, 3]] * rows if guided else []), 0)


def codes_of(state) -> torch.Tensor:
    return torch.stack(state.codes, 2)


@pytest.mark.parametrize("which", ["plain", "gqa+positions"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_codes_equal_the_growing_cache_loop(models, which, scale):
    model = models[which]
    ids, mask = prompts(scale != 1)
    sampling = ImageSampling(cfg_scale=scale, temperature=0)
    static = codes_of(generate_image_codes(model, ids, mask, sampling))
    growing = codes_of(generate_image_codes_growing(model, ids, mask, sampling))
    assert static.shape == (2, model.config.num_codebooks, model.config.image_positions)
    assert torch.equal(static, growing)
    assert len(set(static.flatten().tolist())) > 4  # a real rollout, not a constant


def test_sampled_codes_equal_the_growing_cache_loop_per_seed(models):
    model = models["plain"]
    ids, mask = prompts(True, rows=3)
    sampling = ImageSampling(cfg_scale=2.0, temperature=1.0, top_k=8)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    static = codes_of(generate_image_codes(model, ids, mask, sampling, gens()))
    growing = codes_of(generate_image_codes_growing(model, ids, mask, sampling, gens()))
    assert torch.equal(static, growing)


def test_an_image_in_the_prompt_and_the_range_check_once_per_request(models, monkeypatch):
    """A chat that shows an image before asking for one: the shown codes are checked (once, at prefill); the
    model's own codes are not re-checked at every position (a host sync each)."""
    model = models["plain"]
    cfg = model.config
    shown = torch.randint(0, cfg.codebook_size, (1, cfg.num_codebooks, cfg.image_positions),
                          generator=torch.Generator().manual_seed(3))
    ids, mask = left_pad([[1, 3, *[-200] * cfg.image_positions, 4, 7, 8, 3]], 0)
    sampling = ImageSampling(cfg_scale=1.0, temperature=0)
    growing = codes_of(generate_image_codes_growing(model, ids, mask, sampling, image_codes=shown))
    calls = []
    check = model.code_embedder.quantizer.check_codes
    monkeypatch.setattr(model.code_embedder.quantizer, "check_codes", lambda c: (calls.append(c.shape), check(c)))
    static = codes_of(generate_image_codes(model, ids, mask, sampling, image_codes=shown))
    assert torch.equal(static, growing)
    assert calls == [shown.shape]


def test_fused_projections_are_bit_identical_to_separate_ones(models):
    model = models["plain"]
    layers, norm, rope = model.model.layers, model.model.norm, model.model.rotary_emb
    fused, separate = LayerStack(layers, norm, rope, rows=3), LayerStack(layers, norm, rope, rows=3, fuse=False)
    assert all(w is not None for w in fused.qkv + fused.gate_up)  # fusing is exact on this machine's kernels
    x = torch.randn(3, model.config.hidden_size)
    positions = torch.tensor([4, 2, 7])
    kv_a, kv_b = fused.new_kv(8, x), separate.new_kv(8, x)
    for _ in range(3):
        a, b = fused.step(x, positions, kv_a), separate.step(x, positions, kv_b)
        assert torch.equal(a, b)
        x, positions = a, positions + 1
    assert int(kv_a.length) == 3


def test_one_decoder_per_shape_reused_and_refreshed_after_training(models):
    """Prompts of lengths in one bucket share a decoder; a weight update reaches its fused copies."""
    torch.manual_seed(2)
    model = spread_weights(UniTokMLLM(small_config()), seed=2)
    sampling = ImageSampling(cfg_scale=1.0, temperature=0)
    short, long_ = left_pad([[1, 9, 3], [1, 8, 3]], 0), left_pad([[1, 5, 6, 7, 3], [1, 8, 3]], 0)
    for ids, mask in (short, long_):
        assert torch.equal(codes_of(generate_image_codes(model, ids, mask, sampling)),
                           codes_of(generate_image_codes_growing(model, ids, mask, sampling)))
    assert len(StaticImageDecoder._built[model]) == 1
    decoder = next(iter(StaticImageDecoder._built[model].values()))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(-1.5)
            layer.mlp.up_proj.weight.mul_(0.5)
    after = codes_of(generate_image_codes(model, *short, sampling))
    assert next(iter(StaticImageDecoder._built[model].values())) is decoder  # the same decoder, refreshed
    assert torch.equal(after, codes_of(generate_image_codes_growing(model, *short, sampling)))
    for rows in ([[1, 9, 3]], [[1, 9, 3]] * 3):  # two more shapes: only the KEEP most recent stay allocated
        generate_image_codes(model, *left_pad(rows, 0), sampling)
    assert len(StaticImageDecoder._built[model]) == StaticImageDecoder.KEEP == 2


def test_threads_generating_with_one_model_do_not_share_buffers(models):
    import threading

    model = models["plain"]
    sampling = ImageSampling(cfg_scale=3.0, temperature=0)
    jobs = [prompts(True), left_pad([[1, 50, 51, 3], [1, 52, 3], [1, 30, 3], [1, 30, 3]], 0)]  # one shape, two prompts
    alone = [codes_of(generate_image_codes(model, *job, sampling)) for job in jobs]
    together, start = [None, None], threading.Barrier(2)

    def run(i):
        start.wait()
        together[i] = codes_of(generate_image_codes(model, *jobs[i], sampling))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_decoders_do_not_keep_their_model_alive():
    model = UniTokMLLM(small_config()).eval()
    generate_image_codes(model, *left_pad([[1, 9, 3]], 0), ImageSampling(cfg_scale=1.0, temperature=0))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_compiled_steps_give_the_same_greedy_codes(models, scale):
    model = models["gqa+positions"]
    ids, mask = prompts(scale != 1)
    sampling = ImageSampling(cfg_scale=scale, temperature=0)
    growing = codes_of(generate_image_codes_growing(model, ids, mask, sampling))
    for _ in range(2):  # the second call reuses the compiled steps
        compiled = codes_of(generate_image_codes(model, ids, mask, sampling, compile=True))
        assert torch.equal(compiled, growing)
    decoder = StaticImageDecoder.for_model(model, ids.shape[0], ids.shape[1], model.config.image_positions, True)
    assert decoder._advance is not decoder._advance_eager


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_logic_on_the_cpu(tmp_path):
    """benchmarks/gpu_checks.py is run when a GPU machine is lent; its CPU path (tiny shapes) runs the same steps."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gpu_checks.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.py"
    done = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["packing"]["ok"] and results["packing"]["worst_relative_grad_diff"] < 1e-4
    assert results["training"]["tokens_per_s"] > 0 and 0 < results["training"]["mfu"] < 1
    loops = {(r["loop"], r["batch"]) for r in results["generation"]}
    assert loops == {("growing", 1), ("static", 1), ("compiled", 1), ("static", 2), ("compiled", 2)}
    assert all(r["codes_equal_first_loop"] for r in results["generation"])
