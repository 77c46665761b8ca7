"""UniTokMLLM behaviour on small configs: loss bookkeeping, caches, generation exactness, processor layouts,
checkpoint formats (ours, released layout, plain Llama), CLIs and bad inputs."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import unitok_cli
from mllm import IGNORE_INDEX, MLLMProcessor, SampleTooLong, UniTokMLLM, UniTokMLLMConfig
from mllm.convert import convert_released, rename_released_key, released_key
from mllm.conversation import get_template
from mllm.generation import (ImageSampling, TextSampling, chat, filter_logits, generate_image_codes,
                             generate_images, generate_text_ids, left_pad)
from mllm.decoding import DepthDecoder
from tokenizer import UniTok, UniTokConfig

IMG = -200


def small_config(**kw) -> UniTokMLLMConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, num_codebooks=4, codebook_size=16, code_dim=4,
                projection_dim=32, projection_heads=2, depth_layers=2, image_positions=6, pad_token_id=0)
    return UniTokMLLMConfig(**{**base, **kw})


def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """N(0, 0.02) init gives near-uniform logits; larger weights make argmax tests meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 2)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return spread_weights(UniTokMLLM(small_config()))


def batch(cfg: UniTokMLLMConfig, seed: int = 0):
    """Row 0: text->image; row 1: image->text; row 2: text only (right padded)."""
    g = torch.Generator().manual_seed(seed)
    N, K = cfg.image_positions, cfg.num_codebooks
    t = lambda n: torch.randint(5, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    r0 = [1, *t(4), 3, *[IMG] * N, 4, 2]
    l0 = [IGNORE_INDEX] * 5 + [3, *[IMG] * N, 4, 2]
    cap = t(3)
    r1 = [1, 3, *[IMG] * N, 4, *cap, 2]
    l1 = [IGNORE_INDEX] * (N + 3) + [*cap, 2]
    r2 = [1, *t(7), 2]
    rows = [(r0, l0), (r1, l1), (r2, list(r2))]
    W = max(len(r) for r, _ in rows)
    ids = torch.zeros(3, W, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (r, lab) in enumerate(rows):
        ids[i, :len(r)], labels[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(lab), 1
    codes = torch.randint(0, cfg.codebook_size, (2, K, N), generator=g)
    return dict(input_ids=ids, labels=labels, attention_mask=mask, image_codes=codes)


# ---------------------------------------------------------------------------- loss
def test_loss_is_the_token_weighted_mean_of_text_and_subcode_ce(model):
    cfg, b = model.config, batch(model.config)
    out = model(**b)
    # recompute from full logits: text CE over all text targets, sub-code CE over all K sub-codes of row 0's image
    full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_codes=b["image_codes"],
                 output_hidden_states=True)
    tgt = b["labels"][:, 1:]
    text_sel = tgt >= 0
    text_ce = torch.nn.functional.cross_entropy(full.logits[:, :-1][text_sel], tgt[text_sel])
    assert out.logits.shape[0] == int(text_sel.sum())  # the LM head ran on text targets only
    h = full.hidden_states[0, 5:5 + cfg.image_positions]  # boi .. last-but-one image slot of row 0
    codes = b["image_codes"][0].T
    logits = model.depth_head.teacher_forced_logits(h, codes)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    z = cfg.z_loss_weight * logits.max(-1).values.pow(2).mean()
    n_txt, n_img = int(text_sel.sum()), cfg.image_positions * cfg.num_codebooks
    expected = (text_ce * n_txt + (ce + z) * n_img) / (n_txt + n_img)
    assert out.n_text_tokens == n_txt and out.n_image_subcodes == n_img
    assert torch.allclose(out.text_loss, text_ce, atol=1e-6)
    assert torch.allclose(out.image_ce, ce, atol=1e-6) and torch.allclose(out.z_loss, z, atol=1e-9)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_text_only_batch_has_no_image_part(model):
    b = batch(model.config)
    out = model(input_ids=b["input_ids"][2:], labels=b["labels"][2:], attention_mask=b["attention_mask"][2:])
    assert out.image_loss is None and out.n_image_subcodes == 0
    assert torch.equal(out.loss, out.text_loss)


def test_quantizer_is_frozen_and_everything_else_trains(model):
    b = batch(model.config)
    model.zero_grad()
    model(**b).loss.backward()
    for name, p in model.named_parameters():
        if ".quantizer." in name:
            assert not p.requires_grad
        else:
            assert p.grad is not None, name
    model.zero_grad()


def test_bad_inputs_raise_clear_errors(model):
    cfg, b = model.config, batch(model.config)
    bad = b["image_codes"].clone()
    bad[0, 0, 0] = cfg.codebook_size
    with pytest.raises(ValueError, match="out of range"):
        model(**{**b, "image_codes": bad})
    with pytest.raises(ValueError, match="image slots"):
        model(**{**b, "image_codes": b["image_codes"][:1]})
    ids = b["input_ids"].clone()
    ids[2, 1] = cfg.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(**{**b, "input_ids": ids})
    labels = b["labels"].clone()
    labels[2, 3] = IMG
    with pytest.raises(ValueError, match="not an image slot"):
        model(**{**b, "labels": labels})
    with pytest.raises(ValueError, match="no supervised position"):
        model(**{**b, "labels": torch.full_like(labels, IGNORE_INDEX)})


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        small_config(projection_heads=3)
    with pytest.raises(ValueError, match="unknown MLLM preset"):
        UniTokMLLMConfig.from_preset("nope")
    assert UniTokMLLMConfig.from_preset("unitok-mllm-7b").code_width == 64


# ---------------------------------------------------------------------------- caches and generation
def test_depth_decoder_steps_equal_the_transformers_layers(model):
    h = torch.randn(5, model.config.hidden_size)
    codes = torch.randint(0, model.config.codebook_size, (5, model.config.num_codebooks))
    full = model.depth_head.teacher_forced_logits(h, codes)
    dec = DepthDecoder(model.depth_head, 5)
    cache = dec.new_cache(h)
    x = h
    for k in range(model.config.num_codebooks):
        step = model.depth_head.linear_head(dec.step(x, cache))
        assert (step - full[:, k]).abs().max() < 1e-5
        if k < model.config.num_codebooks - 1:
            x = model.depth_head.codebooks[k](codes[:, k])


@pytest.fixture(scope="module")
def positioned_model():
    """The optional per-position image embedding (off in the release), with weights large enough to matter."""
    torch.manual_seed(1)
    return spread_weights(UniTokMLLM(small_config(image_position_embedding=True)), seed=1)


@pytest.mark.parametrize("which", ["model", "positioned_model"])
def test_projection_cache_embeds_positions_as_a_whole_image(which, request):
    model = request.getfixturevalue(which)
    codes = torch.randint(0, model.config.codebook_size, (2, model.config.num_codebooks, model.config.image_positions))
    whole = model.code_embedder(codes)
    from tokenizer.projection import ProjectionCache
    cache = ProjectionCache()
    steps = torch.cat([model.code_embedder(codes[:, :, j:j + 1], cache) for j in range(codes.shape[2])], 1)
    assert (steps - whole).abs().max() < 1e-5


def test_image_position_embedding_adds_one_row_per_slot(model, positioned_model):
    """Off in the release (no extra tensor, so released checkpoints load strictly); on, slot j gets row j added."""
    assert model.code_embedder.position_embedding is None
    assert "code_embedder.position_embedding.weight" not in model.state_dict()
    cfg = positioned_model.config
    codes = torch.zeros(1, cfg.num_codebooks, cfg.image_positions, dtype=torch.long)
    emb = positioned_model.code_embedder
    without = emb.mm_projector(emb.attn_projection(emb.lookup(codes)))
    assert torch.allclose(emb(codes)[0], without[0] + emb.position_embedding.weight, atol=1e-6)


@pytest.mark.parametrize("value", ["2d", "sincos", 1])
def test_bad_image_position_embedding_is_one_clear_error(value):
    """The option is a learned table or none: anything but true/false fails at construction, naming the field."""
    with pytest.raises(ValueError, match="image_position_embedding must be true or false"):
        UniTokMLLM(small_config(image_position_embedding=value))


def _teacher_forced_guided_argmax(model, ids, mask, codes, scale):
    """Re-run the prompts followed by the generated image as one training-style forward and take the argmax of
    the guided teacher-forced sub-code logits."""
    N = model.config.image_positions
    R = ids.shape[0]
    full_ids = torch.cat([ids, torch.full((R, N), IMG)], 1)
    full_mask = torch.cat([mask, torch.ones(R, N, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    both = torch.cat([codes, codes]) if scale != 1 else codes
    out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos, image_codes=both,
                output_hidden_states=True)
    h = out.hidden_states[:, ids.shape[1] - 1:-1]  # states before each image slot
    logits = model.depth_head.teacher_forced_logits(h.reshape(-1, h.shape[-1]),
                                                    both.permute(0, 2, 1).reshape(-1, both.shape[1]))
    logits = logits.view(R, N, *logits.shape[1:])
    if scale != 1:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    return logits.argmax(-1).permute(0, 2, 1)


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("which", ["model", "positioned_model"])
def test_greedy_rollout_equals_teacher_forced_argmax(which, scale, request):
    """The reference fails this (its cached loop embeds each new position alone, spec §h.2)."""
    model = request.getfixturevalue(which)
    ids, mask = left_pad([[1, 10, 11, 12, 3], [1, 20, 3]] + ([[1, 30, 3]] * 2 if scale != 1 else []), 0)
    state = generate_image_codes(model, ids, mask, ImageSampling(cfg_scale=scale, temperature=0))
    codes = torch.stack(state.codes, 2)
    assert codes.shape == (2, model.config.num_codebooks, model.config.image_positions)
    assert torch.equal(codes, _teacher_forced_guided_argmax(model, ids, mask, codes, scale))


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and not torch.isinf(filter_logits(logits, 2)[0, :2]).any()
    p = logits.softmax(-1)[0]  # 0.61, 0.22, 0.14, 0.03
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[0]) + 0.01))[0]
    assert kept.tolist() == [True, True, False, False]  # first entry crossing top_p is kept
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))[0]).tolist() == [True, False, False, False]


class _ToyTokenizer:
    """Whitespace tokenizer with offsets (enough for processor tests without training sentencepiece)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self):
        self.vocab = {"</s>": 2}

    def __len__(self):
        return 90

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        import re
        ids, offsets = [], []
        for m in re.finditer(r"</s>|(?:(?!</s>)\S)+", text):
            ids.append(self.vocab.setdefault(m.group(), 5 + len(self.vocab)))
            offsets.append((m.start(), m.end()))
        return type("Enc", (), {"input_ids": ids, "offset_mapping": offsets})()

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv.get(i, "?") for i in ids if not (skip_special_tokens and i < 5))


def test_per_request_seeds_make_images_independent_of_the_batch(model):
    proc = MLLMProcessor(_ToyTokenizer(), model.config)
    sampling = ImageSampling(cfg_scale=3.0, temperature=1.0, top_k=8)
    alone = generate_images(model, proc, ["a red circle"], sampling, seeds=[7])
    together = generate_images(model, proc, ["two blue squares on the left", "a red circle"], sampling, seeds=[3, 7])
    assert torch.equal(alone[0], together[1])
    again = generate_images(model, proc, ["a red circle"], sampling, seeds=[8])
    assert not torch.equal(alone, again)


def test_text_generation_guards_the_context(model):
    ids = torch.ones(1, model.config.max_position_embeddings - 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_text_ids(model, ids, sampling=TextSampling(max_new_tokens=8))


# ---------------------------------------------------------------------------- processor layouts
def test_processor_layouts():
    cfg = small_config()
    proc = MLLMProcessor(_ToyTokenizer(), cfg, max_length=64)
    N = cfg.image_positions
    t2i = proc.text_to_image("a cat")
    assert t2i.input_ids[-N - 3:] == [3, *[IMG] * N, 4, 2] and t2i.labels[-N - 3:] == [3, *[IMG] * N, 4, 2]
    assert all(lab == IGNORE_INDEX for lab in t2i.labels[:-N - 3]) and t2i.generates_image
    assert proc.text_to_image(None).input_ids[1] == proc.tokenizer.vocab["<unconditional>"]
    i2t = proc.image_to_text("a cat")
    assert i2t.input_ids[:N + 3] == [1, 3, *[IMG] * N, 4]
    assert i2t.labels == [IGNORE_INDEX] * (N + 3) + i2t.input_ids[N + 3:]
    messages = [{"role": "user", "content": "<image>\nwhat is it?"}, {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": "colour?"}, {"role": "assistant", "content": "red"}]
    enc = proc.chat(messages)
    trained = [proc.tokenizer.decode([i], skip_special_tokens=False) for i, lab in zip(enc.input_ids, enc.labels)
               if lab != IGNORE_INDEX]
    assert trained == ["a", "cat", "</s>", "red", "</s>"]
    assert enc.input_ids.count(IMG) == N and enc.input_ids[enc.input_ids.index(IMG) - 1] == 3  # unitok: boi/eoi
    released = MLLMProcessor(_ToyTokenizer(), cfg, template="vicuna_v1").chat(messages)
    assert 3 not in released.input_ids and released.input_ids.count(IMG) == N
    text, spans = get_template("unitok_nosys").render(messages)
    assert text == "USER: <image>\nwhat is it? ASSISTANT: a cat</s>USER: colour? ASSISTANT: red</s>"
    assert [text[a:b] for a, b in spans] == [" a cat</s>", " red</s>"]
    prompt = proc.chat_prompt(messages[:1])
    assert proc.tokenizer.decode(prompt[-1:]) == "ASSISTANT:"
    assert proc.generation_prompt("a cat")[-1] == 3
    with pytest.raises(SampleTooLong):
        MLLMProcessor(_ToyTokenizer(), cfg, max_length=8).text_to_image("a cat")
    with pytest.raises(ValueError, match="alternate"):
        proc.chat([{"role": "assistant", "content": "hi"}])


# ---------------------------------------------------------------------------- checkpoints
def test_save_and_auto_load_roundtrip(tmp_path):
    m = spread_weights(UniTokMLLM(small_config(tie_word_embeddings=True)))
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is UniTokMLLM and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    b = batch(m.config)
    assert torch.equal(m(**b).loss, loaded(**b).loss)


def _released_layout(model: UniTokMLLM) -> dict[str, torch.Tensor]:
    return {released_key(k): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["sharded-safetensors", "bin"])
def test_convert_released_layout(model, tmp_path, fmt):
    src = tmp_path / "released"
    src.mkdir()
    cfg = model.config
    llama = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps", "tie_word_embeddings", "pad_token_id")}
    (src / "config.json").write_text(json.dumps({**llama, "model_type": "mini_gemini", "rope_theta": 10000.0,
                                                 "architectures": ["MiniGeminiLlamaForCausalLM"]}))
    state = _released_layout(model)
    assert any(k.startswith("ar_head.") for k in state)
    assert all(rename_released_key(released_key(k)) == k for k in model.state_dict())  # the two are inverses
    if fmt == "bin":
        torch.save(state, src / "pytorch_model.bin")
    else:
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in halves.items():
            save_file({k: state[k].contiguous() for k in ks}, src / name)
        (src / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    sizes = dict(num_codebooks=cfg.num_codebooks, codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
                 projection_dim=cfg.projection_dim, projection_heads=cfg.projection_heads,
                 depth_layers=cfg.depth_layers, image_positions=cfg.image_positions)
    convert_released(src, tmp_path / "ours", **sizes)
    converted = UniTokMLLM.from_pretrained(tmp_path / "ours").eval()
    assert converted.config.chat_template == "vicuna_v1"
    b = batch(cfg)
    assert torch.equal(model(**b).loss, converted(**b).loss)
    with pytest.raises(ValueError, match="does not match the released layout"):
        convert_released(src, tmp_path / "bad", **{**sizes, "depth_layers": 3})
    assert not (tmp_path / "bad").exists()


def test_convert_rejects_a_truncated_checkpoint(tmp_path):
    src = tmp_path / "released"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mini_gemini", "hidden_size": 32,
                                                 "num_attention_heads": 4}))
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    assert unitok_cli.main(["convert-mllm", str(src), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_from_llama_keeps_the_backbone_and_takes_the_tokenizer_codebooks(tmp_path):
    llama_cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    llama = LlamaForCausalLM(llama_cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    unitok = UniTok(UniTokConfig.from_preset("tiny"))
    tc = unitok.config
    m = UniTokMLLM.from_llama(str(tmp_path / "llama"), unitok=unitok, num_codebooks=tc.num_codebooks,
                              codebook_size=tc.codebook_size, code_dim=tc.latent_dim // tc.num_codebooks,
                              projection_dim=tc.width, projection_heads=tc.width // tc.latent_dim,
                              image_positions=tc.num_positions).eval()
    ids = torch.randint(5, 96, (2, 9))
    assert torch.allclose(m(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(m.code_embedder.quantizer.codebooks[3].codebook.weight, unitok.quantizer.codebooks[3].codebook.weight)
    assert torch.equal(m.code_embedder.attn_projection.mlp.w2.weight, unitok.post_quant_proj.mlp.w2.weight)
    with pytest.raises(ValueError, match="do not match"):
        m.load_tokenizer_weights(UniTok(UniTokConfig.from_preset("tiny", codebook_size=128)))

    # a backbone tensor the checkpoint lacks is an error naming it (was: left randomly initialised)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "llama" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks backbone tensors: model.layers.1.self_attn.q_proj.weight \(1\)"):
        UniTokMLLM.from_llama(str(tmp_path / "llama"), unitok=unitok)


# ---------------------------------------------------------------------------- CLIs
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from mllm_train_helpers import write_tiny_pair

    return write_tiny_pair(tmp_path_factory.mktemp("pair"))


def test_generate_cli_writes_pngs_and_grid(tiny_pair, tmp_path):
    from PIL import Image

    out = tmp_path / "gen"
    rc = unitok_cli.main(["generate", "a red circle", "--model", str(tiny_pair / "mllm"), "--tokenizer",
                          str(tiny_pair / "unitok"), "-n", "2", "--cfg", "3", "--seed", "0", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png"]
    assert Image.open(out / "00000.png").size == (64, 64)


def test_chat_cli_survives_a_bad_image_and_answers(tiny_pair, tmp_path, monkeypatch, capsys):
    from PIL import Image
    from test_faults import png_header_only

    good = tmp_path / "good.png"
    Image.new("RGB", (80, 50), (200, 30, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bomb = tmp_path / "bomb.png"  # a header claiming 30000 x 30000 pixels: refused before decoding, that turn only
    bomb.write_bytes(png_header_only(30000, 30000))
    script = (f"/image {bad}\nwhat colour is it?\n/image {bomb}\nand this?\n/image {good}\nwhat colour is it?\n"
              "how many?\n/quit\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc = unitok_cli.main(["chat", "--model", str(tiny_pair / "mllm"), "--tokenizer", str(tiny_pair / "unitok"),
                          "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "error:" in captured.err and "bad.png" in captured.err
    assert "bomb.png has 900000000 pixels, over the limit" in captured.err
    assert captured.out.count("assistant> ") == 2  # each bad image ended its turn; the next two were answered


def test_chat_function_uses_images(tiny_pair):
    from mllm.cli import load_mllm

    model, proc = load_mllm(str(tiny_pair / "mllm"))
    codes = torch.randint(0, model.config.codebook_size, (1, model.config.num_codebooks, model.config.image_positions))
    msgs = [{"role": "user", "content": "<image>\nwhat colour is it?"}]
    a = chat(model, proc, msgs, codes, TextSampling(max_new_tokens=5))
    assert a == chat(model, proc, msgs, codes, TextSampling(max_new_tokens=5))  # greedy is deterministic
    with pytest.raises(ValueError, match="image slots"):
        chat(model, proc, msgs, None, TextSampling(max_new_tokens=5))


# ---------------------------------------------------------------------------- pictures in chat
def test_an_assistant_image_is_trained_like_text_to_image():
    cfg = small_config()
    N = cfg.image_positions
    draw = [{"role": "user", "content": "draw a cat"}, {"role": "assistant", "content": "<image>"}]
    for template in ("unitok", "vicuna_v1"):  # boi/eoi frame a drawn image even where shown images are bare
        enc = MLLMProcessor(_ToyTokenizer(), cfg, template=template).chat(draw)
        assert enc.num_images == 1
        start = enc.input_ids.index(3)
        assert enc.input_ids[start:start + N + 3] == [3, *[IMG] * N, 4, 2]
        assert enc.labels[start:start + N + 3] == [3, *[IMG] * N, 4, 2]  # boi, N image targets, eoi, eos
        assert all(lab == IGNORE_INDEX for lab in enc.labels[:start - 1])
    shown = MLLMProcessor(_ToyTokenizer(), cfg).chat([{"role": "user", "content": "<image>\nwhat?"},
                                                      {"role": "assistant", "content": "a cat"}])
    assert IMG not in shown.labels  # a user's image is context, never a target


def test_reply_draws_when_the_model_emits_boi(tmp_path, monkeypatch):
    """After boi the picture is the image loop's rollout on the whole conversation (its images included) + boi,
    guided by the unconditional prompt, with the request's seed. (Weights spread to unit scale: at the init's scale
    the sub-code logits are nearly flat, and whether the shown image changes a sampled code depended on test order.)"""
    import mllm.generation as gen
    from mllm.cli import load_mllm
    from mllm_train_helpers import write_tiny_pair

    model, proc = load_mllm(str(write_tiny_pair(tmp_path, spread=1.0) / "mllm"))
    cfg = model.config
    shown = torch.randint(0, cfg.codebook_size, (1, cfg.num_codebooks, cfg.image_positions),
                          generator=torch.Generator().manual_seed(0))
    msgs = [{"role": "user", "content": "<image>\ndraw a red circle"}]
    words = proc.tokenizer("red", add_special_tokens=False).input_ids
    monkeypatch.setattr(gen, "generate_text_ids",
                        lambda *a, **k: torch.tensor([words + [cfg.boi_token_id]]))
    sampling = ImageSampling(cfg_scale=3.0, temperature=1.0)
    out = gen.reply(model, proc, msgs, shown, image_sampling=sampling, seed=5)
    assert out.text == "red" and out.image_codes.shape == (cfg.num_codebooks, cfg.image_positions)
    assert out.message() == {"role": "assistant", "content": "red <image>"}
    ids, mask = left_pad([proc.chat_prompt(msgs) + words + [cfg.boi_token_id],
                          proc.generation_prompt(None, unconditional=True)], proc.pad_token_id)
    expected = generate_image_codes(model, ids, mask, sampling, [torch.Generator().manual_seed(5)], image_codes=shown)
    assert torch.equal(out.image_codes, torch.stack(expected.codes, 2)[0])
    other = gen.reply(model, proc, msgs, (shown + 1) % cfg.codebook_size, image_sampling=sampling, seed=5)
    assert not torch.equal(other.image_codes, out.image_codes)  # the shown image conditions the drawing
    def no_drawing(*a, **k):
        raise AssertionError("chat() is text only: it must not run the image loop")

    monkeypatch.setattr(gen, "generate_image_codes", no_drawing)
    assert gen.chat(model, proc, msgs, shown) == "red"  # ends at boi, undrawn
    monkeypatch.setattr(gen, "generate_text_ids", lambda *a, **k: torch.tensor([words + [proc.eos_token_id]]))
    assert gen.reply(model, proc, msgs, shown).image_codes is None  # a reply in words draws nothing


@pytest.mark.parametrize("argv, named", [
    (["chat", "--temperature", "-1"], "temperature=-1.0"),
    (["chat", "--top-p", "0"], "top_p=0.0"),
    (["chat", "--top-p", "2"], "top_p=2.0"),
    (["chat", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["generate", "a red circle", "--out", "x", "-n", "10000"], "--num-images must be between 1 and 256"),
    (["generate", "a red circle", "--out", "x", "--top-p", "0"], "top_p"),
])
def test_sampling_flags_out_of_range_are_one_line_errors_before_loading(argv, named, capsys, tmp_path):
    """chat refuses what generate refuses, and both refuse before loading anything (the model paths do not exist)."""
    import unitok_cli

    code = unitok_cli.main([*argv, "--model", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_generate_refuses_a_prompt_that_leaves_no_room_for_the_image(tiny_pair, capsys):
    """A prompt whose tokens plus the image positions exceed the context is one clear line (was: silently run past
    the trained positions)."""
    import unitok_cli
    from mllm.cli import load_mllm
    from mllm.generation import generate_images

    model, proc = load_mllm(str(tiny_pair / "mllm"))
    room = model.config.max_position_embeddings - model.config.image_positions
    fits = "red " * 5
    assert len(proc.generation_prompt(fits)) <= room
    long = "red " * (2 * room)
    with pytest.raises(ValueError, match=f"at most {room} prompt tokens"):
        generate_images(model, proc, [fits, long], ImageSampling(cfg_scale=1.0, temperature=0))
    code = unitok_cli.main(["generate", long, "--out", str(tiny_pair / "out-long"), "--model", str(tiny_pair / "mllm"),
                            "--tokenizer", str(tiny_pair / "unitok"), "-n", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "leaves no room for the image" in err and "Traceback" not in err
