"""Faults and bad input through the `unitok` CLI: each case asserts the exit code, that the one-line message names
the problem, and that no file already on disk changed. (Checkpoint faults live in test_resume.py, sampling limits
in test_mllm.py, bad data records in test_mllm_data.py.)"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unitok_cli
from mllm import UniTokMLLM, UniTokMLLMConfig
from tokenizer import UniTok, UniTokConfig
from tokenizer.image import load_image, to_rgb

from mllm_train_helpers import make_data, write_recipe


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = unitok_cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "unitok"
    UniTok(UniTokConfig.from_preset("tiny")).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ no silent clobbering
def test_generate_refuses_an_out_folder_holding_earlier_images(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"earlier run")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    # refused before the (here nonexistent) model is loaded: a wrong --out costs nothing
    code, err = cli(["generate", "a red circle", "--model", str(tmp_path / "nope"), "--tokenizer", "nope",
                     "--out", str(out)], capsys)
    assert code == 2
    assert_one_line(err, str(out), "00000.png", "--overwrite")
    assert snapshot(tmp_path) == before
    # --overwrite gets past the check (and fails on the model, leaving the folder as it was)
    code, err = cli(["generate", "a", "--model", str(tmp_path / "nope"), "--tokenizer", "nope", "--out", str(out),
                     "--overwrite"], capsys)
    assert code == 2 and "no model folder" in err


def test_decode_refuses_an_out_folder_holding_earlier_pngs_and_a_file_as_out(tmp_path, tok_dir, capsys):
    codes = torch.zeros((1, 8, 16), dtype=torch.int16)
    save_file({"codes": codes}, tmp_path / "c.safetensors")
    out = tmp_path / "dec"
    out.mkdir()
    (out / "00000_x.png").write_bytes(b"old")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    code, err = cli(["decode", str(tmp_path / "c.safetensors"), "--tokenizer", str(tok_dir), "--out", str(out)],
                    capsys)
    assert code == 2
    assert_one_line(err, "00000_x.png", "--overwrite")
    code, err = cli(["decode", str(tmp_path / "c.safetensors"), "--tokenizer", str(tok_dir), "--out",
                     str(tmp_path / "file")], capsys)
    assert code == 2
    assert_one_line(err, "is a file")
    assert snapshot(tmp_path) == before
    assert cli(["decode", str(tmp_path / "c.safetensors"), "--tokenizer", str(tok_dir), "--out", str(out),
                "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000_00000.png"]  # the earlier run's PNG is gone


def test_encode_refuses_to_replace_a_codes_file(tmp_path, tok_dir, capsys):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "c.safetensors").write_bytes(b"precious")
    code, err = cli(["encode", str(tmp_path / "a.png"), "--tokenizer", str(tok_dir), "--out",
                     str(tmp_path / "c.safetensors")], capsys)
    assert code == 2
    assert_one_line(err, "c.safetensors", "--overwrite")
    assert (tmp_path / "c.safetensors").read_bytes() == b"precious"


@pytest.mark.parametrize("command", ["train", "train-tokenizer"])
def test_a_new_run_refuses_an_output_dir_holding_an_earlier_run(tmp_path, capsys, command):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "meta.json").write_text('{"step": 2}')
    (run / "final" if command == "train" else run / "model").mkdir()
    if command == "train":
        files = make_data(tmp_path / "data", n=8)
        config = write_recipe(tmp_path, files, run)
        argv = ["train", "--config", str(config)]
    else:
        config = Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "demo.yaml"
        argv = ["train-tokenizer", "--config", str(config), f"train.output_dir={run}"]
    before = snapshot(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2
    assert_one_line(err, str(run), "--resume", "--overwrite")
    assert snapshot(tmp_path) == before
    # train.output_dir naming a file: one line, nothing written
    (tmp_path / "afile").write_text("x")
    code, err = cli(argv + [f"train.output_dir={tmp_path / 'afile'}"], capsys)
    assert code == 2
    assert_one_line(err, "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_extract_codes_resumes_its_own_extraction_and_refuses_any_other(tmp_path, tok_dir, capsys):
    """A re-run of the same extraction resumes; another input file, another tokenizer of the same shape, or shards
    without settings in --out are refused (their shards would have been mixed in, exit 0), naming what differs;
    --overwrite replaces them and leaves the user's other files."""
    for name, colour in (("a", 40), ("b", 200)):
        Image.new("RGB", (64, 64), (colour, 90, 30)).save(tmp_path / f"{name}.png")
        rows = [{"image": f"{name}.png", "text": f"{name} {i}"} for i in range(3)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(1)
    other_tok = tmp_path / "other-unitok"  # the same shape, other weights
    UniTok(UniTokConfig.from_preset("tiny")).save_pretrained(other_tok)

    def extract(data, tok=tok_dir, *extra):
        return cli(["extract-codes", "--tokenizer", str(tok), "--data", str(tmp_path / data), "--out",
                    str(tmp_path / "codes"), "--shard-size", "2", "--num-workers", "0",
                    "--cache-dir", str(tmp_path / "hf"), *extra], capsys)

    assert extract("a.jsonl")[0] == 0
    (tmp_path / "codes" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "codes")
    assert extract("a.jsonl")[0] == 0  # the same extraction: finished shards are kept
    assert snapshot(tmp_path / "codes") == before
    for data, tok, needle in (("b.jsonl", tok_dir, "b.jsonl"), ("a.jsonl", other_tok, "tokenizer_sha256")):
        code, err = extract(data, tok)
        assert code == 2
        assert_one_line(err, str(tmp_path / "codes"), "holds an extraction with other settings", needle,
                        "--overwrite")
        assert snapshot(tmp_path / "codes") == before
    assert extract("b.jsonl", tok_dir, "--overwrite")[0] == 0
    import pyarrow.parquet as pq

    shards = sorted((tmp_path / "codes").glob("*.parquet"))
    assert [r["text"] for r in pq.read_table(shards).to_pylist()] == ["b 0", "b 1", "b 2"]
    assert (tmp_path / "codes" / "notes.txt").read_text() == "mine"

    (tmp_path / "codes" / "extract.json").unlink()  # shards whose settings are unknown
    before = snapshot(tmp_path / "codes")
    code, err = extract("b.jsonl")
    assert code == 2
    assert_one_line(err, "codes-00000-of-00002.parquet", "--overwrite")
    assert snapshot(tmp_path / "codes") == before


# ------------------------------------------------------------------------------------------ codes files
@pytest.mark.parametrize("meta, codes_shape, needle", [
    ({"codebook_size": "4096"}, (1, 8, 16), "codebook_size=4096, the tokenizer has 256"),
    ({"num_positions": "256"}, (1, 8, 16), "num_positions=256, the tokenizer has 16"),
    ({"num_codebooks": "4"}, (1, 8, 16), "num_codebooks=4, the tokenizer has 8"),
    ({}, (1, 8, 64), "64 along axis 2 (num_positions), the tokenizer has 16"),
    ({"images": json.dumps(["only-one.png"])}, (3, 8, 16), "3 code images but 1 image names"),
])
def test_decode_checks_codes_against_the_tokenizer(tmp_path, tok_dir, capsys, meta, codes_shape, needle):
    save_file({"codes": torch.zeros(codes_shape, dtype=torch.int16)}, tmp_path / "c.safetensors", metadata=meta)
    code, err = cli(["decode", str(tmp_path / "c.safetensors"), "--tokenizer", str(tok_dir), "--out",
                     str(tmp_path / "dec")], capsys)
    assert code == 2
    assert_one_line(err, "c.safetensors", needle)
    assert not (tmp_path / "dec").exists() or not any((tmp_path / "dec").iterdir())


# ------------------------------------------------------------------------------------------ model folders
@pytest.fixture()
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model"
    UniTokMLLM(UniTokMLLMConfig.from_preset("tiny")).save_pretrained(path)
    return path


def _break_missing_tensor(path: Path) -> str:
    state = load_file(path / "model.safetensors")
    key = next(k for k in state if k.endswith("layers.1.self_attn.q_proj.weight"))
    del state[key]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return key


def _break_truncate(path: Path) -> str:
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:5000])
    return "model.safetensors"


def _break_config(path: Path) -> str:
    (path / "config.json").write_text("{not json")
    return "config.json"


def _break_delete_weights(path: Path) -> str:
    (path / "model.safetensors").unlink()
    return str(path)


@pytest.mark.parametrize("damage", [_break_missing_tensor, _break_truncate, _break_config, _break_delete_weights])
def test_a_damaged_model_folder_is_one_line_naming_the_problem(model_dir, tmp_path, capsys, damage):
    needle = damage(model_dir)
    before = snapshot(tmp_path)
    code, err = cli(["generate", "a circle", "--model", str(model_dir), "--tokenizer", "x", "--out",
                     str(tmp_path / "out")], capsys)
    assert code == 2
    assert_one_line(err, str(model_dir), needle)
    assert snapshot(tmp_path) == before


def test_strict_load_names_missing_tensors_unless_allowed(model_dir):
    key = _break_missing_tensor(model_dir)
    with pytest.raises(ValueError, match=f"missing {key}"):
        UniTokMLLM.from_pretrained(model_dir)
    model = UniTokMLLM.from_pretrained(model_dir, allow_missing=(key,))  # a caller that initialises it itself
    assert model.state_dict()[key].shape == (128, 128)


# ------------------------------------------------------------------------------------------ error policy
def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(sys.modules, "fake_cmd", SimpleNamespace(add_arguments=lambda p: None, run=boom))
    monkeypatch.setitem(unitok_cli.COMMANDS, "boom", ("fake_cmd", "raises"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        unitok_cli.main(["boom"])

    def user_error(args):
        raise ValueError("data.sources[0].paths: no file matches x*.jsonl")

    monkeypatch.setitem(sys.modules, "fake_cmd", SimpleNamespace(add_arguments=lambda p: None, run=user_error))
    code, err = cli(["boom"], capsys)
    assert code == 2 and err == "unitok boom: error: data.sources[0].paths: no file matches x*.jsonl"


# ------------------------------------------------------------------------------------------ images
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535, 257 * 10]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = np.asarray(load_image(tmp_path / "g16.png"))
    assert px[0, :, 0].tolist() == [0, 128, 255, 10]  # the old convert("RGB") gave [0, 255, 255, 255]


def test_transparency_palette_cmyk_and_exif_rotation(tmp_path):
    la = np.stack([np.full((2, 2), 100, np.uint8), np.array([[0, 255], [128, 255]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = np.asarray(load_image(tmp_path / "la.png"))[..., 0]
    assert grey.tolist() == [[255, 100], [177, 100]]  # alpha 0 -> the white background, 128 -> half way

    rgba = Image.new("RGBA", (1, 1), (200, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255]]]

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]

    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg"))[0, 0].tolist()
    assert r > 240 and g < 15 and b < 15  # cyan 0, magenta + yellow full: red

    img = Image.new("RGB", (3, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # top-left red, landscape 3x2
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "rot.png", exif=exif)
    view = np.asarray(load_image(tmp_path / "rot.png"))
    assert view.shape == (3, 2, 3)  # shown as portrait
    assert view[..., 0].tolist() == [[0, 255], [0, 0], [0, 0]]  # the red corner moved to the top-right


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_importing_our_packages_leaves_pils_pixel_guard_alone():
    """The pixel limit is ours per open: importing the packages must not turn off PIL's decompression-bomb guard for
    every other image reader in the process (a server's included)."""
    code = ("import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; import tokenizer, tokenizer.image, mllm, "
            "mllm.cli, train.common.datasources, train.data.sources, serve.api, eval.vqa_runner; "
            "print(before, I.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] != "None"


def test_oversized_images_are_refused_before_decoding(tmp_path, tok_dir, capsys, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    # beyond PIL's own guard (which we leave as it is), its refusal becomes our one line
    with pytest.raises(ValueError, match=r"bomb.png has 900000000 pixels, over the limit of 67108864 "):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "big.png").write_bytes(png_header_only(10000, 8000))  # under PIL's guard, over ours
    with pytest.raises(ValueError, match=r"big.png is 10000x8000 = 80000000 pixels, over the limit of 67108864"):
        load_image(tmp_path / "big.png")
    code, err = cli(["encode", str(tmp_path / "bomb.png"), "--tokenizer", str(tok_dir), "--out",
                     str(tmp_path / "c.safetensors")], capsys)
    assert code == 2
    assert_one_line(err, "bomb.png", "UNITOK_MAX_IMAGE_PIXELS")
    assert not (tmp_path / "c.safetensors").exists()
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setenv("UNITOK_MAX_IMAGE_PIXELS", "100")  # configurable
    with pytest.raises(ValueError, match="20x20 = 400 pixels, over the limit of 100"):
        load_image(tmp_path / "small.png")
    # in a training source it is a counted bad record, not a crash
    from train.common.datasources import BadRecord, load_image as load_record_image

    with pytest.raises(BadRecord, match="over the limit of 100"):
        load_record_image(io.BytesIO((tmp_path / "small.png").read_bytes()).getvalue(), None)
