"""Collation of MLLM batches: padding-free packing gives the same loss and gradients as right padding, and attention
never crosses samples packed into one row."""
from __future__ import annotations

import pytest
import torch

from mllm.configuration import IGNORE_INDEX, UniTokMLLMConfig
from mllm.conversation import get_template
from mllm.modeling import UniTokMLLM
from mllm.processing import MLLMProcessor
from train.data import MLLMCollator, Sample, pack_rows

CORPUS = [get_template("unitok").system, "Generate an image based on this description.", "<unconditional>",
          "a red circle left of a blue square", "what colour is the shape? it is green",
          "the quick brown fox jumps over the lazy dog", "USER: ASSISTANT: </s>"] * 8


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoTokenizer

    from train.text_tokenizer import train_sentencepiece

    path = train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=320)
    return MLLMProcessor(AutoTokenizer.from_pretrained(str(path)), UniTokMLLMConfig.from_preset("tiny"))


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    model = UniTokMLLM(processor.config).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the N(0, 0.02) init, so logits and gradients are far from trivial
        for p in model.parameters():
            if p.ndim > 1 and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _codes(cfg: UniTokMLLMConfig, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.codebook_size, (cfg.num_codebooks, cfg.image_positions), generator=g)


def _samples(processor) -> list[Sample]:
    """Text, image->text, text->image (one unconditional) and a two-image chat, as the data layer builds them."""
    cfg, g = processor.config, torch.Generator().manual_seed(0)
    p = processor
    chat = [{"role": "system", "content": "Be brief."},  # a short system prompt keeps the test fast
            {"role": "user", "content": "<image>\nwhat colour is the shape? <image>"},
            {"role": "assistant", "content": "it is green"}, {"role": "user", "content": "and the fox?"},
            {"role": "assistant", "content": "brown"}]
    return [Sample.from_encoded(p.text("the quick brown fox"), [], "text"),
            Sample.from_encoded(p.image_to_text("a red circle"), [_codes(cfg, g)], "i2t"),
            Sample.from_encoded(p.text_to_image("a blue square"), [_codes(cfg, g)], "t2i"),
            Sample.from_encoded(p.chat(chat), [_codes(cfg, g), _codes(cfg, g)], "chat"),
            Sample.from_encoded(p.text_to_image(None), [_codes(cfg, g)], "t2i", unconditional=True),
            Sample.from_encoded(p.image_to_text("lazy dog"), [_codes(cfg, g)], "i2t"),
            Sample.from_encoded(p.text("green"), [], "text")]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "counts"}
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_pack_rows_first_fit():
    assert pack_rows([5, 4, 3, 2, 6], max_tokens=8) == [[0, 2], [1, 3], [4]]
    assert pack_rows([8, 1], max_tokens=8) == [[0], [1]]
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_rows([9], max_tokens=8)
    with pytest.raises(ValueError, match="fits in none of the 1 rows"):
        pack_rows([5, 5], max_tokens=8, max_rows=1)


def test_packed_batch_layout(processor):
    samples = _samples(processor)
    lens = [len(s) for s in samples]
    max_tokens = max(lens) + min(lens) + 10
    col = MLLMCollator.from_processor(processor, "pack", max_tokens)
    b = col(samples)
    assert set(b) == {"input_ids", "labels", "position_ids", "image_codes", "counts", "cu_seq_lens_q", "cu_seq_lens_k",
                      "max_length_q", "max_length_k"}
    rows = pack_rows(lens, max_tokens)
    assert b["input_ids"].shape == (len(rows), max(sum(lens[i] for i in r) for r in rows))
    assert any(len(r) > 1 for r in rows)
    img = processor.config.image_placeholder_id
    expected_codes = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = samples[i], lens[i]
            assert b["input_ids"][r, at:at + n].tolist() == s.input_ids
            assert b["position_ids"][r, at:at + n].tolist() == list(range(n))  # restarts per sample
            assert b["labels"][r, at].item() == IGNORE_INDEX  # no prediction across a boundary
            assert b["labels"][r, at + 1:at + n].tolist() == s.labels[1:]
            expected_codes += s.images
            at += n
        assert (b["labels"][r, at:] == IGNORE_INDEX).all() and (b["input_ids"][r, at:] == processor.pad_token_id).all()
        assert b["position_ids"][r, at:].tolist() == list(range(b["input_ids"].shape[1] - at))
    # images in order of appearance, row-major
    assert torch.equal(b["image_codes"], torch.stack(expected_codes))
    assert int((b["input_ids"] == img).sum()) == b["image_codes"].shape[0] * processor.config.image_positions
    c = b["counts"]
    assert c["samples"] == len(samples) and c["tokens"] == sum(lens) and c["images"] == len(expected_codes)
    assert c["samples_t2i"] == 2 and c["samples_t2i_uncond"] == 1 and c["samples_chat"] == 1
    assert c["image_targets"] == 2 * processor.config.image_positions
    padded = MLLMCollator.from_processor(processor, "pad", pad_to_multiple_of=8)(samples)
    assert padded["input_ids"].shape == (len(samples), -(-max(lens) // 8) * 8)
    assert padded["attention_mask"].sum(1).tolist() == lens
    assert padded["counts"]["text_targets"] == c["text_targets"]  # the same supervised tokens in both layouts


def test_packed_loss_and_grads_equal_padded(model, processor):
    samples = _samples(processor)
    lens = [len(s) for s in samples]
    padded = MLLMCollator.from_processor(processor, "pad")(samples)
    packed = MLLMCollator.from_processor(processor, "pack", max(lens) + min(lens) + 10)(samples)
    assert packed["input_ids"].shape[0] < len(samples)  # several samples share a row
    out_pad, g_pad = _loss_and_grads(model, padded)
    out_pack, g_pack = _loss_and_grads(model, packed)
    assert out_pack.n_text_tokens == out_pad.n_text_tokens and out_pack.n_image_subcodes == out_pad.n_image_subcodes
    assert out_pad.n_image_subcodes > 0 and out_pad.n_text_tokens > 0
    assert abs(out_pack.loss.item() - out_pad.loss.item()) < 1e-5
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 10
    for name, g in g_pad.items():
        diff = (g_pack[name] - g).norm().item()
        assert diff <= 1e-4 * g.norm().item() + 1e-9, (name, diff, g.norm().item())


def test_attention_never_crosses_packed_samples(model, processor):
    cfg, g = processor.config, torch.Generator().manual_seed(3)
    first = Sample.from_encoded(processor.image_to_text("a red circle"), [_codes(cfg, g)], "i2t")
    other = Sample.from_encoded(processor.text("the quick brown fox jumps over the lazy dog"), [], "text")
    second = Sample.from_encoded(processor.chat([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "<image>\nwhat colour?"}]),
                                 [_codes(cfg, g)], "chat")
    col = MLLMCollator.from_processor(processor, "pack", 10_000)

    def logits(a):
        b = col.collate_rows([[a, second]])
        with torch.no_grad():
            return model(input_ids=b["input_ids"], position_ids=b["position_ids"], image_codes=b["image_codes"],
                         use_cache=False).logits[0, len(a):]

    changed = Sample(list(first.input_ids), first.labels, [_codes(cfg, g)], "i2t")
    changed.input_ids[-3] = (changed.input_ids[-3] + 7) % 300 + 5
    ref = logits(first)
    for a in (changed, other):  # other tokens, other image codes, another length before the second sample
        assert torch.allclose(logits(a), ref, atol=1e-5)
    alone = col.collate_rows([[second]])
    with torch.no_grad():
        solo = model(input_ids=alone["input_ids"], image_codes=alone["image_codes"], use_cache=False).logits[0]
    assert torch.allclose(solo, ref, atol=1e-5)


# --------------------------------------------------------------------------------------------- flash-attention path
VARLEN = "varlen_reference"


def _segments_attention(q, k, v, starts, causal, scale):
    """Causal attention within each [start, end) segment of the token axis: q/k/v [T, heads, dim] -> [T, heads, dim]."""
    out = torch.empty_like(q)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, scale=scale,
            enable_gqa=True)
        out[a:b] = o.transpose(0, 1)
    return out


def _reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0]
    assert int(max_seqlen_q) == int(cu_seqlens_q.diff().max())
    return _segments_attention(q, k, v, cu_seqlens_q, causal, softmax_scale)


def _reference_dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                     deterministic=False):
    """flash_attn_func: [B, L, heads, dim], each row one sequence."""
    B, L = q.shape[:2]
    starts = torch.arange(0, B * L + 1, L)
    return _segments_attention(*(x.reshape(B * L, *x.shape[2:]) for x in (q, k, v)), starts, causal,
                               softmax_scale).view(B, L, *q.shape[2:])


@pytest.fixture
def varlen_attention(monkeypatch):
    """transformers' own flash-attention entry point (``flash_attention_forward`` and the flash mask), with the kernels
    replaced by exact torch references. The model then sees exactly what flash-attention 2 is given and attends only
    within the sequences transformers tells the kernel about: a leak across packed samples shows up as on a GPU."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    real = fa._lazy_imports

    def lazy_imports(implementation, *args, **kwargs):
        if implementation != VARLEN:
            return real(implementation, *args, **kwargs)
        return _reference_dense, _reference_varlen, None, fa._pad_input, fa._unpad_input

    monkeypatch.setattr(fa, "_lazy_imports", lazy_imports)
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    AttentionInterface.register(VARLEN, flash_attention_forward)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return VARLEN


def test_packed_rows_are_exact_under_flash_attention(model, processor, varlen_attention):
    """Several packed rows per micro-batch (as every 7B recipe has) under the flash-attention path give the loss and
    gradients of the unpacked samples: no sample attends to the samples before it in its row."""
    from mllm import hf_compat as hf

    samples = _samples(processor)
    lens = [len(s) for s in samples]
    padded = MLLMCollator.from_processor(processor, "pad")(samples)
    packed = MLLMCollator.from_processor(processor, "pack", max(lens) + min(lens) + 10, pad_to_multiple_of=8)(samples)
    assert 1 < packed["input_ids"].shape[0] < len(samples)  # several rows, several samples in a row
    out_pad, g_pad = _loss_and_grads(model, padded)  # sdpa, padded: the reference
    hf.set_attn_implementation(model.config, varlen_attention)
    try:
        out_pack, g_pack = _loss_and_grads(model, packed)
        out_pad_fa, _ = _loss_and_grads(model, padded)  # padding through the flash path (unpad/pad) stays exact
    finally:
        hf.set_attn_implementation(model.config, "sdpa")
    assert abs(out_pad_fa.loss.item() - out_pad.loss.item()) < 1e-5
    assert abs(out_pack.loss.item() - out_pad.loss.item()) < 1e-5, (out_pack.loss.item(), out_pad.loss.item())
    for name, g in g_pad.items():
        diff = (g_pack[name] - g).norm().item()
        assert diff <= 1e-4 * g.norm().item() + 1e-9, (name, diff, g.norm().item())


def test_packed_batch_names_every_sequence_for_varlen_kernels(processor):
    """``cu_seq_lens_*`` cover the flattened rows: one sequence per sample and per row tail, ``max_length_*`` ints."""
    samples = _samples(processor)[:3]
    lens = [len(s) for s in samples]
    b = MLLMCollator.from_processor(processor, "pack", 10_000, pad_to_multiple_of=8).collate_rows(
        [samples[:2], samples[2:]])
    R, L = b["input_ids"].shape
    tails = [L - lens[0] - lens[1], L - lens[2]]
    bounds = [0, lens[0], lens[0] + lens[1]] + ([L] if tails[0] else []) + [L + lens[2]] + ([2 * L] if tails[1] else [])
    assert b["cu_seq_lens_q"].tolist() == bounds and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["cu_seq_lens_k"] is b["cu_seq_lens_q"]
    assert b["max_length_q"] == b["max_length_k"] == max(torch.tensor(bounds).diff().tolist())
    assert isinstance(b["max_length_q"], int)
