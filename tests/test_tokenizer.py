"""UniTok model behaviour on the `tiny` preset: quantiser invariants, I/O, official-format loading, bad input."""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import unitok_cli
from tokenizer import MultiCodebookQuantizer, UniTok, UniTokConfig
from tokenizer.image import load_image, preprocess, to_pil, to_tensor
from tokenizer.projection import AttnProjection, ProjectionCache
from tokenizer.text import ByteTokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UniTok(UniTokConfig.from_preset("tiny")).eval()


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------- quantiser
def make_quantizer(K=4, V=32, C=16, **kw):
    torch.manual_seed(1)
    q = MultiCodebookQuantizer(K, V, C, **kw)
    for b in q.codebooks:  # spread the entries out so searches are not degenerate
        torch.nn.init.normal_(b.codebook.weight)
    return q


def test_codes_are_local_to_each_book_and_match_brute_force_nearest_neighbour():
    q = make_quantizer()
    f = torch.randn(3, 10, 16)
    codes = q.f_to_idx(f)
    assert codes.shape == (3, 4, 10) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 32  # no per-book offset
    for i, book in enumerate(q.codebooks):
        chunk = F.normalize(f[..., 4 * i: 4 * i + 4], dim=-1)
        entries = F.normalize(book.codebook.weight, dim=-1)
        nearest = torch.cdist(chunk, entries[None].expand(3, -1, -1)).argmin(-1)  # L2 on the sphere
        assert torch.equal(codes[:, i], nearest)


def test_lookup_uses_normalised_entries_in_book_order():
    q = make_quantizer()
    codes = torch.randint(0, 32, (2, 4, 7))
    f = q.idx_to_f(codes)
    assert f.shape == (2, 7, 16)
    chunks = f.unflatten(-1, (4, 4))
    torch.testing.assert_close(chunks.norm(dim=-1), torch.ones(2, 7, 4))
    expected = F.normalize(q.codebooks[2].codebook.weight[codes[1, 2, 5]], dim=-1)
    torch.testing.assert_close(chunks[1, 5, 2], expected)
    # a latent that is exactly a codebook entry maps back to itself
    assert torch.equal(q.f_to_idx(f), codes)


def test_straight_through_forward_value_and_gradient():
    q = make_quantizer()
    f = torch.randn(2, 5, 16, requires_grad=True)
    out = q(f)
    torch.testing.assert_close(out.f_hat, q.idx_to_f(out.codes), atol=1e-6, rtol=0)
    w = torch.randn_like(out.f_hat)
    (out.f_hat * w).sum().backward()
    # STE: d f_hat / d f equals the Jacobian of the chunk-wise normalisation
    f2 = f.detach().clone().requires_grad_(True)
    (F.normalize(f2.unflatten(-1, (4, 4)), dim=-1).flatten(2) * w).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    assert f.grad.abs().sum() > 0


def test_vq_loss_is_beta_weighted_commitment_plus_codebook_term():
    q = make_quantizer(beta=0.25)
    f = torch.randn(2, 5, 16)
    out = q(f)
    chunks = F.normalize(f.unflatten(-1, (4, 4)), dim=-1)
    e = q.idx_to_f(out.codes).unflatten(-1, (4, 4))
    per_book = ((e - chunks) ** 2).mean(dim=(0, 1, 3))
    torch.testing.assert_close(out.vq_loss, (1.25 * per_book).mean())
    # the codebook term moves the codebook, the commitment term moves the encoder output
    f.requires_grad_(True)
    q(f).vq_loss.backward()
    assert q.codebooks[0].codebook.weight.grad.abs().sum() > 0 and f.grad.abs().sum() > 0


def test_entropy_loss_sign_and_diversity():
    q = make_quantizer(entropy_weight=1.0, entropy_temperature=0.01)
    entries = q.idx_to_f(torch.arange(32).repeat(4, 1)[None])  # every entry once, all books
    diverse = q(entries).entropy_loss
    collapsed = q(entries[:, :1].expand(1, 32, 16).contiguous()).entropy_loss
    assert q(torch.zeros(1, 1, 16) + 1).entropy_loss.item() <= 1e-6  # H(mean p) >= mean H(p): never positive
    assert diverse.item() < collapsed.item() <= 1e-6
    assert diverse.item() == pytest.approx(-math.log(32), abs=0.05)  # confident and uniform usage
    assert make_quantizer()(entries).entropy_loss.item() == 0.0  # off unless its weight is set


def test_usage_statistics():
    q = make_quantizer()
    codes = torch.tensor([[[0, 1, 2, 3]] * 4])  # 4 distinct entries used in each book
    out = q(q.idx_to_f(codes))
    assert out.usage.item() == pytest.approx(4 / 32 * 100)
    torch.testing.assert_close(q.codebooks[0].vocab_usage[:5], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))


def test_out_of_range_codes_raise(tiny):
    K, N = tiny.config.num_codebooks, tiny.config.num_positions
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(torch.full((1, K, N), tiny.config.codebook_size))
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(torch.full((1, K, N), -1))
    with pytest.raises(ValueError, match=r"\[B, 8, N\]"):
        tiny.decode(torch.zeros(1, K - 1, N, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        tiny.decode(torch.zeros(1, K, N + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        tiny.decode(torch.zeros(1, K, N))


# ---------------------------------------------------------------------------------------------- projection
def test_causal_projection_cache_equals_full_sequence():
    torch.manual_seed(0)
    for cin, cout, heads in [(16, 64, 4), (64, 16, 4)]:
        proj = AttnProjection(cin, cout, heads, causal=True).eval()
        x = torch.randn(2, 9, cin)
        full = proj(x)
        cache = ProjectionCache()
        steps = [proj(x[:, :3], cache)] + [proj(x[:, t: t + 1], cache) for t in range(3, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=0)
        assert cache.length == 9
        # a causal prefix does not depend on what follows
        torch.testing.assert_close(proj(x[:, :4]), full[:, :4], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="causal"):
        AttnProjection(16, 64, 4)(torch.randn(1, 2, 16), ProjectionCache())


# ---------------------------------------------------------------------------------------------- model API
def test_encode_decode_shapes_and_ranges(tiny):
    x = images()
    codes = tiny.encode(x)
    c = tiny.config
    assert codes.shape == (2, c.num_codebooks, c.num_positions) and codes.dtype == torch.int64
    rec = tiny.decode(codes)
    assert rec.shape == x.shape and rec.min() >= -1 and rec.max() <= 1
    out = tiny(x, tiny.tokenize_text(["a red circle", "two blue squares"]))
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.rec.clamp(-1, 1), rec, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    assert out.text_features.shape == (2, c.embed_dim)


def test_raster_order_of_positions(tiny):
    """Position n = row * grid + col: changing only the top-left 16x16 patch changes codes at n=0 first."""
    x = images(1)
    y = x.clone()
    y[:, :, :16, :16] = -x[:, :, :16, :16]
    g = tiny.config.grid_size
    changed = (tiny.encode(x) != tiny.encode(y)).any(1)[0].view(g, g)
    assert changed[0, 0]


@pytest.mark.parametrize("shape,match", [((1, 1, 64, 64), "RGB"), ((1, 4, 64, 64), "RGB"),
                                         ((1, 3, 64, 48), "square"), ((1, 3, 70, 70), "64x64"),
                                         ((3, 64, 64), "RGB")])
def test_bad_image_shapes_raise(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.zeros(shape))


def test_image_value_range_and_dtype_checked(tiny):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tiny.encode(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(TypeError, match="float"):
        tiny.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_text_tokenizer_and_tower_checks(tiny):
    tok = ByteTokenizer(8)
    ids = tok(["ab", "abcdefghijk"])
    assert ids[0].tolist() == [256, 97, 98, 257, 0, 0, 0, 0]
    assert ids[1].tolist() == [256, 97, 98, 99, 100, 101, 102, 257]  # truncated, EOT kept
    with pytest.raises(ValueError, match="context length"):
        tiny.encode_text(torch.zeros(1, tiny.config.text_context_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        tiny.encode_text(torch.full((1, 4), tiny.config.text_vocab_size))


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by num_codebooks"):
        UniTokConfig.from_preset("tiny", latent_dim=60)
    with pytest.raises(ValueError, match="multiple of 16"):
        UniTokConfig.from_preset("tiny", image_size=72)
    with pytest.raises(ValueError, match="unknown UniTok config field"):
        UniTokConfig.from_preset("tiny", colour="red")
    with pytest.raises(ValueError, match="unknown UniTok preset"):
        UniTokConfig.from_preset("huge")
    large = UniTokConfig.from_preset("unitok-large")
    assert (large.num_codebooks, large.codebook_size, large.code_dim, large.num_positions) == (8, 4096, 8, 256)
    assert large.attn_projection_heads == 16


# ---------------------------------------------------------------------------------------------- I/O
def test_save_load_identity(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = UniTok.from_pretrained(tmp_path / "tok")
    assert loaded.config == tiny.config
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = images()
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    # overwriting an existing folder is atomic and leaves no temporary folders behind
    tiny.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def official_container(model: UniTok, args) -> dict:
    return {"args": args, "epoch": 0, "iter": 0,
            "trainer": {"config": {}, "unitok": OrderedDict(model.state_dict())}}


def test_official_container_loads_with_config(tiny, tmp_path):
    path = tmp_path / "unitok_tokenizer.pth"
    torch.save(official_container(tiny, OrderedDict(model="vitamin_tiny", dtype=torch.bfloat16)), path)
    loaded = UniTok.from_pretrained(path, preset="tiny")
    x = images()
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    with pytest.raises(ValueError, match="unknown ViTamin variant 'vitamin_tiny'"):
        UniTok.from_pretrained(path)


class Sneaky:
    """Pickles to a call of os.system: must never run when a checkpoint is read."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unreadable_pickled_args_never_run_code(tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pth"
    torch.save(official_container(tiny, Sneaky(marker)), path)
    with pytest.raises(ValueError, match="cannot be read safely.*preset"):
        UniTok.from_pretrained(path)
    loaded = UniTok.from_pretrained(path, preset="tiny")  # tensors are still read safely
    assert not marker.exists()
    assert torch.equal(loaded.encode(images()), tiny.encode(images()))


def test_truncated_and_mismatched_checkpoints_raise(tiny, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(official_container(tiny, {}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        UniTok.from_pretrained(path, preset="tiny")
    tiny.save_pretrained(tmp_path / "tok")
    w = tmp_path / "tok" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        UniTok.from_pretrained(tmp_path / "tok")
    state = OrderedDict(tiny.state_dict())
    state.pop("decoder.norm.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"trainer": {"unitok": state}}, path)
    with pytest.raises(ValueError, match="1 missing \\(decoder.norm.weight\\); 1 unexpected \\(extra.weight\\)"):
        UniTok.from_pretrained(path, preset="tiny")
    with pytest.raises(FileNotFoundError):
        UniTok.from_pretrained(tmp_path / "nothing.pth", preset="tiny")


# ---------------------------------------------------------------------------------------------- images + CLI
def test_preprocess_and_corrupt_image(tmp_path):
    x = torch.linspace(-1, 1, 3 * 40 * 60).view(3, 40, 60)
    to_pil(x).save(tmp_path / "wide.png")
    y = preprocess(tmp_path / "wide.png", 32)
    assert y.shape == (3, 32, 32) and y.min() >= -1 and y.max() <= 1
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_cli_encode_decode_round_trip(tiny, tmp_path, capsys):
    tiny.save_pretrained(tmp_path / "tok")
    x = images(2)
    for i, img in enumerate(x):
        to_pil(img).save(tmp_path / f"img{i}.png")
    codes_path = tmp_path / "codes.safetensors"
    argv = ["encode", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(codes_path)]
    assert unitok_cli.main(argv) == 0
    from tokenizer.cli import read_codes

    codes, meta = read_codes(codes_path)
    expected = tiny.encode(torch.stack([preprocess(tmp_path / f"img{i}.png", 64) for i in range(2)]))
    assert torch.equal(codes, expected)
    assert meta["num_codebooks"] == "8" and meta["num_positions"] == "16"
    assert unitok_cli.main(["decode", str(codes_path), "--tokenizer", str(tmp_path / "tok"),
                            "--out", str(tmp_path / "dec"), "--grid"]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["00000_img0.png", "00001_img1.png", "grid.png"]
    dec = to_tensor(load_image(tmp_path / "dec" / "00000_img0.png"))
    torch.testing.assert_close(dec, tiny.decode(expected)[0], atol=1 / 127.5 + 1e-6, rtol=0)
    # a corrupt input image: clear error, exit code 2, and the existing output file is untouched
    (tmp_path / "bad.png").write_bytes(b"junk")
    before = codes_path.read_bytes()
    assert unitok_cli.main(["encode", str(tmp_path / "bad.png"), "--tokenizer", str(tmp_path / "tok"),
                            "--out", str(codes_path), "--overwrite"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert codes_path.read_bytes() == before
