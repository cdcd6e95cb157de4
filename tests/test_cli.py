"""The command line: tables, and every bad input as one clear line with exit status 2."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from conftest import FIXTURE_CKPT, FIXTURE_SPEC
from diffprobe.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("diffprobe: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_blocks_table(capsys):
    code, out, _ = run(capsys, "blocks", FIXTURE_SPEC)
    assert code == 0
    assert "   13  middle_block                       64        4×4" in out
    assert "(ddpm)" in out and "t is the DDPM timestep in 0..999" in out
    assert out.count("\n") == 29 and "--all` lists those" in out  # the table, then where inner modules are listed


def test_blocks_of_the_paper_model_from_flags(capsys):
    code, out, _ = run(capsys, "blocks", "adm:random", "--model-flags",  # one quoted value, as users paste it
                       "--image_size 64 --num_channels 32 --channel_mult 1,1,2,2,4,4 --attention_resolutions 8,4,2 --num_head_channels 32",
                       "--json")  # fmt: skip
    assert code == 0 and '"index": 37' in out


def test_presets_listed(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "256x256_diffusion_uncond: --attention_resolutions 32,16,8" in out


@pytest.fixture()
def store_args(cifar_small, tmp_path):
    return ["--data", str(cifar_small), "--blocks", "13", "--t", "90", "--out", str(tmp_path / "store")]


def test_extract_and_describe(capsys, store_args, tmp_path):
    code, out, _ = run(capsys, "extract", FIXTURE_SPEC, *store_args, "--limit", "40")
    assert code == 0 and "40 rows, 1 complete arrays" in out
    code, out, _ = run(capsys, "store", str(tmp_path / "store"))
    assert code == 0 and '"t0090_b13_p1"' in out


def test_missing_checkpoint(capsys, store_args, tmp_path):
    assert_one_line_error(*run(capsys, "extract", f"adm:{tmp_path}/none.pt", *store_args)[::2], "checkpoint not found")


def test_corrupt_checkpoint(capsys, store_args, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert_one_line_error(*run(capsys, "extract", f"adm:{bad}", *store_args)[::2], "corrupt or not a PyTorch file")


def test_pickle_that_is_not_a_state_dict(capsys, store_args, tmp_path):
    bad = tmp_path / "model.pt"
    torch.save(torch.nn.Conv2d(3, 3, 1), bad)
    assert_one_line_error(*run(capsys, "blocks", f"adm:{bad}")[::2], "refused for safety", "torch.save(")


def test_unknown_preset(capsys):
    assert_one_line_error(*run(capsys, "blocks", FIXTURE_SPEC, "--preset", "imagenet_999")[::2], "unknown ADM preset")


def test_preset_checkpoint_mismatch(capsys):
    code, _, err = run(capsys, "blocks", FIXTURE_SPEC, "--preset", "256x256_diffusion_uncond")
    assert_one_line_error(code, err, "does not match preset 256x256_diffusion_uncond", "shapes differ", "checkpoint [32, 3, 3, 3], model [256, 3, 3, 3]")
    assert len(err) < 700


def test_block_out_of_range(capsys, store_args):
    args = [a if a != "13" else "26" for a in store_args]
    assert_one_line_error(*run(capsys, "extract", FIXTURE_SPEC, *args)[::2], "block 26 is out of range")


def test_timestep_outside_schedule(capsys, store_args):
    args = [a if a != "90" else "1000" for a in store_args]
    assert_one_line_error(*run(capsys, "extract", FIXTURE_SPEC, *args)[::2], "timestep 1000 is outside")


def test_empty_dataset_folder(capsys, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    code, _, err = run(capsys, "extract", FIXTURE_SPEC, "--data", str(tmp_path / "empty"), "--blocks", "3", "--t", "9", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no images in")


def test_unreadable_image(capsys, tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "cat" / "good.png")
    (tmp_path / "d" / "cat" / "bad.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "extract", FIXTURE_SPEC, "--data", str(tmp_path / "d"), "--blocks", "3", "--t", "9", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cannot read image", "bad.png")


def test_store_from_another_model(capsys, store_args, tmp_path):
    assert run(capsys, "extract", FIXTURE_SPEC, *store_args, "--limit", "20")[0] == 0
    shutil.copy(FIXTURE_CKPT, tmp_path / "copy.pt")
    shutil.copy(FIXTURE_CKPT.with_suffix(".json"), tmp_path / "copy.json")
    sd = torch.load(tmp_path / "copy.pt", weights_only=True)
    sd["out.2.bias"] += 1.0
    torch.save(sd, tmp_path / "copy.pt")
    code, _, err = run(capsys, "extract", f"adm:{tmp_path / 'copy.pt'}", *store_args, "--limit", "20")
    assert_one_line_error(code, err, "holds other features (backbone", "--overwrite")


def test_not_a_store(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "store", str(tmp_path))[::2], "is not a feature store")


def test_bad_spec_and_flags(capsys):
    assert_one_line_error(*run(capsys, "blocks", "unet:foo")[::2], "not understood")
    assert_one_line_error(*run(capsys, "blocks", FIXTURE_SPEC, "--model-flags=--image_size")[::2], "'--name value' pairs")
    assert_one_line_error(*run(capsys, "blocks", FIXTURE_SPEC, "-o", "image_size")[::2], "expected key=value")
