"""MLLM training data: every source format, the weighted mixture, CFG dropout, bad-record accounting, code extraction
(with resume) and the exact resume of the batch stream."""
from __future__ import annotations

import collections
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unitok_cli
from mllm.configuration import UniTokMLLMConfig
from mllm.conversation import get_template
from mllm.processing import MLLMProcessor
from tokenizer.image import preprocess
from train.common.config import ConfigError, from_dict
from train.data import MLLMDataConfig, MLLMDataLoader, SourceConfig

SIZE = 64  # the tiny UniTok's image size (4x4 = 16 positions, as the tiny MLLM preset)
CORPUS = [get_template("unitok").system, "Generate an image based on this description.", "<unconditional>",
          "caption cap picture of a red circle", "what colour is the shape? it is green", "hello world text",
          "USER: ASSISTANT: </s>"] * 8


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoTokenizer

    from train.text_tokenizer import train_sentencepiece

    path = train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=320)
    return MLLMProcessor(AutoTokenizer.from_pretrained(str(path)), UniTokMLLMConfig.from_preset("tiny"))


def _png(i: int, size=(20, 24)) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _pixels(i: int) -> torch.Tensor:
    return preprocess(Image.open(io.BytesIO(_png(i))), SIZE)


def _codes(i: int) -> list:
    return np.random.default_rng(1000 + i).integers(0, 256, (8, 16)).tolist()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _loader(tmp_path, sources, processor, **kw) -> MLLMDataLoader:
    cfg = dict(num_workers=0, cache_dir=str(tmp_path / "hf"), image_size=SIZE, bad_check_min_records=10_000,
               batching="pad", batch_size=4, max_tokens=400)
    cfg.update(kw)
    image_tokenizer = cfg.pop("image_tokenizer", None)
    return MLLMDataLoader(MLLMDataConfig(sources=sources, **cfg), processor, image_tokenizer=image_tokenizer)


def _take(loader: MLLMDataLoader, n: int) -> list:
    return list(itertools.islice(loader.samples(), n))


# ================================================================================================ sources
def test_pair_formats_jsonl_parquet_webdataset_folder(tmp_path, processor):
    import datasets

    (tmp_path / "j").mkdir()
    for i in range(4):
        (tmp_path / "j" / f"{i}.png").write_bytes(_png(i))
    files = {"jsonl": _jsonl(tmp_path / "j" / "d.jsonl", [{"image": f"{i}.png", "text": f"cap {i}"} for i in range(4)])}
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = {"image": [{"bytes": _png(i), "path": None} for i in range(4)], "text": [f"cap {i}" for i in range(4)]}
    datasets.Dataset.from_dict(table, features=feats).to_parquet(tmp_path / "d.parquet")
    files["parquet"] = tmp_path / "d.parquet"
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(4):
            for ext, data in (("png", _png(i)), ("txt", f"cap {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    files["webdataset"] = tmp_path / "shard-{000..000}.tar"
    (tmp_path / "f").mkdir()
    for i in range(4):
        (tmp_path / "f" / f"{i}.png").write_bytes(_png(i))
        (tmp_path / "f" / f"{i}.txt").write_text(f"cap {i}\n")
    files["folder"] = tmp_path / "f"

    expected = {tuple(processor.image_to_text(f"cap {i}").input_ids): _pixels(i) for i in range(4)}
    for fmt, path in files.items():
        loader = _loader(tmp_path, [SourceConfig("pairs", "i2t", [str(path)])], processor)
        assert loader.sources[0].format == fmt
        samples = _take(loader, 8)  # two epochs
        assert collections.Counter(tuple(s.input_ids) for s in samples) == {k: 2 for k in expected}, fmt
        for s in samples:
            assert s.kind == "i2t" and len(s.images) == 1 and torch.equal(s.images[0], expected[tuple(s.input_ids)])
        assert loader.stats.bad == 0 and loader.stats.seen == 8

    # precomputed codes (a `codes` column), text->image, in JSONL and parquet
    rows = [{"text": f"cap {i}", "codes": _codes(i)} for i in range(3)]
    _jsonl(tmp_path / "c.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "c.parquet")
    expected = {tuple(processor.text_to_image(f"cap {i}").input_ids): torch.tensor(_codes(i)) for i in range(3)}
    for path in ("c.jsonl", "c.parquet"):
        loader = _loader(tmp_path, [SourceConfig("t2i", "t2i", [str(tmp_path / path)], cfg_dropout=0.0)], processor)
        for s in _take(loader, 3):
            assert s.kind == "t2i" and torch.equal(s.images[0], expected[tuple(s.input_ids)])
            assert s.images[0].dtype == torch.long


def test_llava_conversations(tmp_path, processor):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(i))
    conv = lambda *turns: [{"from": f, "value": v} for f, v in turns]  # noqa: E731
    good = {
        "one": ("0.png", conv(("human", "<image>\nwhat colour is the shape?"), ("gpt", "it is green"))),
        "two": (["1.png", "2.png"], conv(("human", "<image> and <image>: what?"), ("gpt", "a circle"),
                                          ("human", "colour?"), ("gpt", "red"))),
        "text": (None, conv(("human", "hello"), ("gpt", "world"))),
    }
    array = [{"id": k, **({"image": im} if im is not None else {}), "conversations": c} for k, (im, c) in good.items()]
    array.append({"id": "notag", "image": "0.png", "conversations": conv(("human", "what?"), ("gpt", "x"))})
    (tmp_path / "a.json").write_text(json.dumps(array))
    _jsonl(tmp_path / "b.jsonl", [
        {"id": "missing", "image": "gone.png", "conversations": conv(("human", "<image>\nwhat?"), ("gpt", "x"))},
        {"id": "gptfirst", "conversations": conv(("gpt", "hi"), ("human", "hello"))},
        {"id": "noconv", "image": "0.png"},
        "{not json"])
    src = SourceConfig("llava", "chat", [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")],
                       image_folder=str(tmp_path / "imgs"), shuffle=False)
    loader = _loader(tmp_path, [src], processor)
    assert loader.sources[0].format == "llava"
    samples = {s.id: s for s in _take(loader, 4)}  # the 3 good records, every bad one, then "one" again
    assert set(samples) == set(good)
    roles = {"human": "user", "gpt": "assistant"}
    for key, (image, turns) in good.items():
        enc = processor.chat([{"role": roles[t["from"]], "content": t["value"]} for t in turns])
        s = samples[key]
        assert s.kind == "chat" and s.input_ids == enc.input_ids and s.labels == enc.labels
        files = [] if image is None else [image] if isinstance(image, str) else image
        assert len(s.images) == len(files)
        for f, px in zip(files, s.images):
            assert torch.equal(px, _pixels(int(f[0])))
    assert loader.stats.seen == 9 and dict(loader.stats.reasons) == {
        "image count mismatch": 1, "image file not found": 1, "bad conversation": 1,
        "missing field 'conversations'": 1, "invalid JSON line: Expecting property name enclosed in double quotes": 1}
    assert loader.stats.sources["llava"].bad == 5


def test_text_corpora(tmp_path, processor):
    import datasets

    _jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": ""}, {"other": 1}, {"text": "text text"}])
    datasets.Dataset.from_dict({"text": ["hello", "world"]}).to_parquet(tmp_path / "t.parquet")
    loader = _loader(tmp_path, [SourceConfig("j", "text", [str(tmp_path / "t.jsonl")]),
                                SourceConfig("p", "text", [str(tmp_path / "t.parquet")])], processor)
    samples = _take(loader, 12)
    texts = {"j": ["hello world", "text text"], "p": ["hello", "world"]}
    for s in samples:
        assert s.kind == "text" and not s.images
        assert s.input_ids in [processor.text(t).input_ids for t in texts[s.source]]
    assert set(loader.stats.sources["j"].reasons) <= {"empty text", "missing field 'text'"}
    assert loader.stats.sources["p"].bad == 0


def test_config_from_yaml_data():
    cfg = from_dict(MLLMDataConfig, {"seed": 3, "sources": [
        {"name": "a", "kind": "caption", "paths": ["x.parquet"], "t2i_ratio": 0.9},
        {"name": "b", "kind": "text", "paths": ["y.jsonl"], "weight": 0.5}]})
    assert isinstance(cfg.sources[0], SourceConfig) and cfg.sources[1].weight == 0.5
    with pytest.raises(ConfigError, match="unknown config key 'sources\\[0\\].wieght'"):
        from_dict(MLLMDataConfig, {"sources": [{"name": "a", "kind": "text", "paths": ["x"], "wieght": 1}]})
    with pytest.raises(ConfigError, match="names must be unique"):
        from_dict(MLLMDataConfig, {"sources": [{"name": "a", "kind": "text", "paths": ["x"]}] * 2})


# ================================================================================================ mixture
def test_mixture_weights_and_seed(tmp_path, processor):
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    sources = []
    for name, w in weights.items():
        _jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(3)])
        sources.append(SourceConfig(name, "text", [str(tmp_path / f"{name}.jsonl")], weight=w))
    loader = _loader(tmp_path, sources, processor, seed=5)
    order = [s.source for s in _take(loader, 2000)]
    freq = collections.Counter(order)
    for name, w in weights.items():
        assert abs(freq[name] / len(order) - w / 8) < 0.035, (name, freq)
    again = [s.source for s in _take(_loader(tmp_path, sources, processor, seed=5), 100)]
    other = [s.source for s in _take(_loader(tmp_path, sources, processor, seed=6), 100)]
    assert again == order[:100] and other != again


def test_cfg_dropout_and_caption_direction(tmp_path, processor):
    _jsonl(tmp_path / "c.jsonl", [{"caption": [f"cap {i}", f"picture {i}"], "codes": _codes(i)} for i in range(4)])
    src = SourceConfig("cap", "caption", [str(tmp_path / "c.jsonl")], t2i_ratio=0.7)
    samples = _take(_loader(tmp_path, [src], processor, cfg_dropout=0.2), 2000)
    t2i = [s for s in samples if s.kind == "t2i"]
    uncond = [s for s in t2i if s.unconditional]
    assert abs(len(t2i) / len(samples) - 0.7) < 0.035
    assert abs(len(uncond) / len(t2i) - 0.2) < 0.035
    null = processor.text_to_image(None).input_ids
    assert all(s.input_ids == null for s in uncond)
    allowed_t2i = {tuple(processor.text_to_image(f"{w} {i}").input_ids) for i in range(4) for w in ("cap", "picture")}
    allowed_i2t = {tuple(processor.image_to_text(f"{w} {i}").input_ids) for i in range(4) for w in ("cap", "picture")}
    assert all(tuple(s.input_ids) in allowed_t2i for s in t2i if not s.unconditional)
    assert all(tuple(s.input_ids) in allowed_i2t for s in samples if s.kind == "i2t")
    assert len({tuple(s.input_ids) for s in samples if s.kind == "i2t"}) == 8  # both captions of every image used


# ================================================================================================ bad records
def test_bad_records_are_counted_and_limited(tmp_path, processor):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [{"image": f"{i}.png", "text": f"cap {i}"} for i in range(4)] + [
        {"image": "bad.png", "text": "corrupt"},
        {"image": "gone.png", "text": "missing file"},
        {"text": "ragged codes", "codes": [[1, 2], [3]]},
        {"text": "wrong shape", "codes": np.zeros((8, 15), int).tolist()},
        {"text": "out of range", "codes": np.full((8, 16), 256).tolist()},
        {"image": "0.png"},
        {"image": "1.png", "text": "long " * 400}]
    _jsonl(tmp_path / "d.jsonl", rows)
    src = SourceConfig("pairs", "i2t", [str(tmp_path / "d.jsonl")], shuffle=False)
    loader = _loader(tmp_path, [src], processor)
    assert len(_take(loader, 5)) == 5  # a whole epoch and the first record of the next
    assert loader.stats.seen == 12 and loader.stats.bad == 7
    assert dict(loader.stats.reasons) == {"cannot decode image (UnidentifiedImageError)": 1, "image file not found": 1,
                                          "bad codes shape": 2, "codes out of range": 1, "no caption": 1,
                                          "sample too long": 1}
    metrics = loader.metrics()
    assert metrics["data/bad"] == 7 and metrics["data/pairs/good"] == 5 and metrics["data/bad/sample too long"] == 1

    loader = _loader(tmp_path, [src], processor, max_bad_fraction=0.5, bad_check_min_records=11)
    with pytest.raises(ValueError) as err:
        _take(loader, 100)
    msg = str(err.value)
    assert "too many bad records in data source 'pairs': 7 of 11 (63.6%) exceed data.max_bad_fraction=0.5" in msg
    assert "2x bad codes shape" in msg and "1x image file not found" in msg


# ================================================================================================ codes
def test_extract_codes_resume_and_training_reads_them(tmp_path, processor, capsys):
    from tokenizer import UniTok, UniTokConfig

    torch.manual_seed(0)
    tok = UniTok(UniTokConfig.from_preset("tiny")).eval()
    tok.save_pretrained(tmp_path / "unitok")
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "data" / "bad.png").write_bytes(_png(9)[:50])  # truncated
    rows = [{"image": "0.png", "text": "cap 0"}, {"image": "bad.png", "text": "cap 9"}] + \
        [{"image": f"{i}.png", "text": f"cap {i}"} for i in (1, 2, 3)]
    _jsonl(tmp_path / "data" / "d.jsonl", rows)
    out = tmp_path / "codes"
    args = ["extract-codes", "--tokenizer", str(tmp_path / "unitok"), "--data", str(tmp_path / "data" / "d.jsonl"),
            "--out", str(out), "--batch-size", "2", "--shard-size", "3", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "hf")]
    assert unitok_cli.main(args) == 0
    shards = sorted(out.glob("*.parquet"))
    assert [p.name for p in shards] == ["codes-00000-of-00002.parquet", "codes-00001-of-00002.parquet"]
    import pyarrow.parquet as pq

    table = pq.read_table(shards).to_pylist()
    assert [r["text"] for r in table] == ["cap 0", "cap 1", "cap 2", "cap 3"]  # the truncated image is skipped
    assert set(table[0]) == {"image", "text", "codes"}
    expected = tok.encode(torch.stack([_pixels(i) for i in range(4)]))
    assert torch.equal(torch.tensor([r["codes"] for r in table]), expected)

    # resume: finished shards are kept, a missing one is redone
    stamp = shards[0].stat().st_mtime_ns
    first = shards[1].read_bytes()
    shards[1].unlink()
    assert unitok_cli.main(args) == 0
    assert shards[0].stat().st_mtime_ns == stamp and shards[1].read_bytes() == first
    assert not list(out.glob(".*tmp"))
    assert unitok_cli.main(args[:-6] + ["--shard-size", "2", "--num-workers", "0", "--cache-dir",
                                        str(tmp_path / "hf")]) == 2
    assert "holds an extraction with other settings" in capsys.readouterr().err

    # training reads the codes column; raw images are encoded on the fly to the same codes
    by_text = {f"cap {i}": expected[i] for i in range(4)}
    loader = _loader(tmp_path, [SourceConfig("x", "i2t", [str(out / "*.parquet")])], processor)
    for s in _take(loader, 4):
        caption = next(c for c in by_text if s.input_ids == processor.image_to_text(c).input_ids)
        assert torch.equal(s.images[0], by_text[caption])
    raw = _loader(tmp_path, [SourceConfig("raw", "i2t", [str(tmp_path / "data" / "d.jsonl")])], processor,
                  batch_size=4, image_tokenizer=tok, image_size=None)
    batch = next(iter(raw))
    assert "pixel_values" not in batch and batch["image_codes"].shape == (4, 8, 16)
    for row, codes in zip(batch["input_ids"], batch["image_codes"]):
        ids = row[row != processor.pad_token_id].tolist()
        caption = next(c for c in by_text if ids == processor.image_to_text(c).input_ids)
        assert torch.equal(codes, by_text[caption])


def test_extract_codes_for_conversations(tmp_path, processor):
    from tokenizer import UniTok, UniTokConfig

    torch.manual_seed(0)
    tok = UniTok(UniTokConfig.from_preset("tiny")).eval()
    tok.save_pretrained(tmp_path / "unitok")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(i))
    conv = lambda *turns: [{"from": f, "value": v} for f, v in turns]  # noqa: E731
    (tmp_path / "chat.json").write_text(json.dumps([
        {"id": "a", "image": "0.png", "conversations": conv(("human", "<image>\nwhat?"), ("gpt", "green"))},
        {"id": "b", "image": ["1.png", "2.png"], "conversations": conv(("human", "<image> <image>"), ("gpt", "two"))},
        {"id": "c", "conversations": conv(("human", "hello"), ("gpt", "world"))},
        {"id": "d", "image": "gone.png", "conversations": conv(("human", "<image>"), ("gpt", "x"))}]))
    out = tmp_path / "codes"
    assert unitok_cli.main(["extract-codes", "--tokenizer", str(tmp_path / "unitok"), "--data",
                            str(tmp_path / "chat.json"), "--image-folder", str(tmp_path / "imgs"), "--out", str(out),
                            "--num-workers", "0", "--cache-dir", str(tmp_path / "hf")]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "codes-00000-of-00001.parquet").to_pylist()
    assert [(r["id"], len(r["codes"])) for r in rows] == [("a", 1), ("b", 2), ("c", 0)]  # d: image missing
    expected = tok.encode(torch.stack([_pixels(i) for i in range(3)]))
    src = SourceConfig("chat", "chat", [str(out / "*.parquet")], shuffle=False)
    batch = next(iter(_loader(tmp_path, [src], processor, batch_size=3)))
    assert torch.equal(batch["image_codes"], expected)  # [M, K, N] in order of appearance
    assert batch["counts"]["samples_chat"] == 3 and batch["counts"]["images"] == 3


def test_streaming_source_and_rank_split(tmp_path, processor):
    _jsonl(tmp_path / "s.jsonl", [{"text": f"hello world {i}"} for i in range(7)])
    _jsonl(tmp_path / "m.jsonl", [{"text": f"text {i}"} for i in range(6)])
    sources = [SourceConfig("s", "text", [str(tmp_path / "s.jsonl")], streaming=True, shuffle_buffer=4),
               SourceConfig("m", "text", [str(tmp_path / "m.jsonl")])]
    a = _loader(tmp_path, sources, processor, batch_size=3)
    it = iter(a)
    full = [next(it) for _ in range(8)]
    seen = {tuple(r[r != processor.pad_token_id].tolist()) for b in full for r in b["input_ids"]}
    streamed = {tuple(processor.text(f"hello world {i}").input_ids) for i in range(7)}
    assert seen <= streamed | {tuple(processor.text(f"text {i}").input_ids) for i in range(6)}
    assert len(seen & streamed) == 7 and a.positions[0][0] >= 1  # the stream was read through (epochs)
    b = _loader(tmp_path, sources, processor, batch_size=3)
    it = iter(b)
    for _ in range(3):
        next(it)
    c = _loader(tmp_path, sources, processor, batch_size=3)
    c.load_state_dict(b.state_dict())
    it = iter(c)
    assert all(_same(x, next(it)) for x in full[3:])
    # ranks read disjoint halves of every epoch of a map-style source
    per_rank = []
    for rank in range(2):
        loader = MLLMDataLoader(MLLMDataConfig(sources=sources[1:], num_workers=0, cache_dir=str(tmp_path / "hf")),
                                processor, rank=rank, world_size=2)
        per_rank.append({tuple(s.input_ids) for s in _take(loader, 3)})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {tuple(processor.text(f"text {i}").input_ids) for i in range(6)}


# ================================================================================================ resume
def _mixture(tmp_path) -> list[SourceConfig]:
    _jsonl(tmp_path / "pairs.jsonl", [{"text": f"cap {i}", "codes": _codes(i)} for i in range(5)] +
           [{"text": "bad", "codes": [[0]]}])
    _jsonl(tmp_path / "text.jsonl", [{"text": f"hello world {i}"} for i in range(7)])
    conv = [{"from": "human", "value": "what colour is it?"}, {"from": "gpt", "value": "green"}]
    (tmp_path / "chat.json").write_text(json.dumps([{"id": str(i), "conversations": conv} for i in range(3)]))
    return [SourceConfig("pairs", "caption", [str(tmp_path / "pairs.jsonl")], weight=2.0),
            SourceConfig("text", "text", [str(tmp_path / "text.jsonl")]),
            SourceConfig("chat", "chat", [str(tmp_path / "chat.json")], weight=0.5)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_resume_continues_with_the_same_batches(tmp_path, processor, batching):
    sources = _mixture(tmp_path)
    kw = dict(batching=batching, batch_size=2 if batching == "pack" else 3, max_tokens=200, seed=11)
    a = _loader(tmp_path, sources, processor, **kw)
    it = iter(a)
    full = [next(it) for _ in range(6)]
    if batching == "pack":
        assert any(b["counts"]["samples"] > b["input_ids"].shape[0] for b in full)  # rows hold several samples
    b = _loader(tmp_path, sources, processor, **kw)
    it = iter(b)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(b.state_dict()))  # plain data, as checkpointed
    c = _loader(tmp_path, sources, processor, **kw)
    c.load_state_dict(state)
    it = iter(c)
    rest = [next(it) for _ in range(4)]
    assert all(_same(x, y) for x, y in zip(full[2:], rest))
    assert c.state_dict() == a.state_dict()  # positions and bad-record counters too
    if batching == "pack":  # the stream does not depend on the number of workers
        w = _loader(tmp_path, sources, processor, num_workers=2, **kw)
        it = iter(w)
        assert all(_same(x, next(it)) for x in full)
    with pytest.raises(ValueError, match="data mixture"):
        _loader(tmp_path, sources[:2], processor, **kw).load_state_dict(state)


def test_long_text_documents_are_chunked_and_resume_mid_document(tmp_path, processor):
    """A text record longer than max_tokens becomes consecutive chunks (every token trained once, none counted bad),
    while an over-long multimodal sample stays a counted skip; resuming after any batch, also in the middle of a
    document's chunks, continues with exactly the batches of an uninterrupted run."""
    words = "red green blue circle square triangle left right above below".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(n)) for i, n in enumerate([90, 3, 40, 7, 120, 2])]
    long_caption = " ".join(words * 12)
    sources = [SourceConfig("docs", "text", [str(_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs]))],
                            shuffle=False),
               SourceConfig("pairs", "caption", [str(_jsonl(tmp_path / "pairs.jsonl", [
                   {"text": "a red circle", "codes": _codes(0)}, {"text": long_caption, "codes": _codes(1)}]))],
                            shuffle=False, t2i_ratio=0.0)]
    kw = dict(max_tokens=40, seed=3)
    plain = _loader(tmp_path, sources[:1], processor, **kw)
    chunks = _take(plain, 60)
    assert all(len(s) <= 40 for s in chunks) and plain.stats.sources["docs"].bad == 0
    at, split = 0, 0
    for d in docs:  # the first epoch, in order: each document's chunks concatenate to the whole document
        want = processor.text(d).input_ids
        got = []
        while len(got) < len(want):
            assert chunks[at].labels == chunks[at].input_ids
            got += chunks[at].input_ids
            at += 1
        assert got == want
        split += len(want) > 40
    assert split >= 3  # the long documents were split
    mixed = _loader(tmp_path, sources, processor, batching="pack", batch_size=2, **kw)
    it = iter(mixed)
    full = [next(it) for _ in range(8)]
    assert mixed.stats.sources["pairs"].reasons.get("sample too long", 0) > 0  # the long caption: skipped, counted
    assert mixed.stats.sources["docs"].bad == 0
    mid_document = 0
    for k in range(1, 7):
        b = _loader(tmp_path, sources, processor, batching="pack", batch_size=2, **kw)
        it = iter(b)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(b.state_dict()))
        mid_document += state["chunk"] > 0
        c = _loader(tmp_path, sources, processor, batching="pack", batch_size=2, **kw)
        c.load_state_dict(state)
        it = iter(c)
        assert all(_same(x, next(it)) for x in full[k:]), k
    assert mid_document > 0  # some checkpoint fell inside a document's chunks


# ================================================================================================ bad data files
@pytest.mark.parametrize("streaming", [False, True])
def test_a_malformed_caption_line_is_a_counted_bad_record(tmp_path, processor, streaming):
    """datasets' JSON reader fails the whole file on one bad line (when streaming: on first read, mid-run); the
    loader parses it line by line instead."""
    lines = [json.dumps({"text": f"cap {i}", "codes": _codes(i)}) for i in range(3)]
    _jsonl(tmp_path / "c.jsonl", [lines[0], '{"text": "cut off', lines[1], "[1, 2]", lines[2]])
    src = SourceConfig("caps", "t2i", [str(tmp_path / "c.jsonl")], shuffle=False, streaming=streaming)
    loader = _loader(tmp_path, [src], processor, cfg_dropout=0.0)
    samples = _take(loader, 3)
    assert [processor.decode(s.input_ids) for s in samples] == [processor.decode(
        processor.text_to_image(f"cap {i}").input_ids) for i in range(3)]
    assert [s.images[0].tolist() for s in samples] == [_codes(i) for i in range(3)]
    assert loader.stats.bad == 2 and dict(loader.stats.reasons) == {
        "invalid JSON line: Invalid control character at": 1, "record is a list, not an object": 1}


def test_an_empty_source_is_an_error_naming_it(tmp_path, processor):
    (tmp_path / "empty.jsonl").write_text("")
    src = SourceConfig("captions", "caption", [str(tmp_path / "empty.jsonl")])
    with pytest.raises(ValueError, match=r"data.sources\[captions\]: .*empty\.jsonl holds no records"):
        _take(_loader(tmp_path, [src], processor), 1)


def test_llava_jsonl_with_codes_keeps_them_under_format_auto(tmp_path, processor):
    conv = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
    _jsonl(tmp_path / "v.jsonl", [{"id": f"q{i}", "conversations": conv, "codes": [_codes(i)]} for i in range(3)])
    src = SourceConfig("vqa", "chat", [str(tmp_path / "v.jsonl")], shuffle=False)  # format: auto -> llava
    loader = _loader(tmp_path, [src], processor)
    assert loader.sources[0].format == "llava"
    samples = _take(loader, 3)
    assert [s.id for s in samples] == ["q0", "q1", "q2"] and loader.stats.bad == 0
    assert [s.images[0].tolist() for s in samples] == [_codes(i) for i in range(3)]


def test_a_damaged_parquet_file_is_named(tmp_path, processor):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "codes": [_codes(0), _codes(1)]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])  # an interrupted copy: no footer
    src = SourceConfig("caps", "t2i", [str(tmp_path / "good.parquet"), str(tmp_path / "cut.parquet")])
    with pytest.raises(ValueError, match=r"data.sources\[caps\]: .*cut\.parquet is not a readable parquet file"):
        _loader(tmp_path, [src], processor)
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "other.parquet")
    src = SourceConfig("caps", "t2i", [str(tmp_path / "good.parquet"), str(tmp_path / "other.parquet")])
    with pytest.raises(ValueError, match=r"other\.parquet has columns \['caption'\]"):
        _loader(tmp_path, [src], processor)
