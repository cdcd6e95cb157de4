"""The ADM backbone against the original guided-diffusion outputs, and its flags and checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE_CKPT, FIXTURE_DIR, FIXTURE_SPEC
from diffprobe import DiffprobeError, load_backbone
from diffprobe.backbones.adm import ADMUNet
from diffprobe.backbones.adm_backbone import adm_block_table
from diffprobe.backbones.adm_config import PRESETS, architecture_from_flags, infer_shape_flags

EXPECTED = load_file(str(FIXTURE_DIR / "adm_uncond_tiny.expected.safetensors"))


def test_reproduces_every_block_and_output_of_the_fixture(fixture_backbone):
    x, t = EXPECTED["x_t"], EXPECTED["t"]
    with torch.inference_mode():
        feats = fixture_backbone.forward_features(x, t, "all")
        out = fixture_backbone.model(x, t)
    assert len(feats) == 25
    for b in range(1, 26):
        ref = EXPECTED[f"block_{b:02d}"]
        assert feats[b].shape == ref.shape
        assert (feats[b] - ref).abs().max().item() <= 1e-4, f"block {b}"
    assert (out - EXPECTED["out"]).abs().max().item() <= 1e-4


def test_same_maths_with_autograd_on(fixture_backbone):
    """Without inference mode the in-place shortcuts are off; results must not change."""
    x, t = EXPECTED["x_t"], EXPECTED["t"]
    with torch.enable_grad():
        out = fixture_backbone.model(x.requires_grad_(True), t)
        out.sum().backward()
    assert (out.detach() - EXPECTED["out"]).abs().max().item() <= 1e-4


def test_schedule_equals_the_fixture(fixture_backbone):
    np.testing.assert_allclose(fixture_backbone.schedule.alphas_cumprod, EXPECTED["alphas_cumprod"].numpy(), rtol=0, atol=1e-12)


def test_early_exit_equals_full_forward_hooks(fixture_backbone):
    x, t = EXPECTED["x_t"], EXPECTED["t"]
    caught = {}
    model = fixture_backbone.model
    handles = [model.get_submodule(fixture_backbone.blocks[b - 1].name).register_forward_hook(
        lambda m, i, o, b=b: caught.__setitem__(b, o.clone())) for b in (5, 13, 19)]  # fmt: skip
    with torch.inference_mode():
        model(x, t)
        early = fixture_backbone.forward_features(x, t, [19, 5, 13])
    for h in handles:
        h.remove()
    assert sorted(early) == [5, 13, 19]
    for b in (5, 13, 19):
        assert torch.equal(early[b], caught[b])


def test_block_table_of_the_paper_model():
    """The 256×256 unconditional model's table, as in the paper (block 24: 1024 ch at 16×16)."""
    arch = architecture_from_flags(PRESETS["256x256_diffusion_uncond"])
    with torch.device("meta"):
        model = ADMUNet(arch)
    table = adm_block_table(model, 256)
    assert len(table) == 37
    expect = {1: (256, 256), 4: (256, 128), 10: (512, 32), 13: (512, 16), 16: (1024, 8), 19: (1024, 8),
              22: (1024, 16), 24: (1024, 16), 25: (1024, 32), 28: (512, 64), 33: (256, 128), 37: (256, 256)}  # fmt: skip
    for b, (ch, res) in expect.items():
        assert (table[b - 1].channels, table[b - 1].resolution) == (ch, res), b
    assert table[18].name == "middle_block" and table[23].name == "output_blocks.4"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(552.8e6, rel=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    arch = architecture_from_flags(PRESETS[name])
    with torch.device("meta"):
        model = ADMUNet(arch)
    assert len(adm_block_table(model, arch.image_size)) == model.num_blocks


VARIANTS = [
    dict(use_new_attention_order=True, num_head_channels=16),
    dict(num_heads=2, num_head_channels=-1),
    dict(use_scale_shift_norm=False, resblock_updown=False, num_head_channels=8),
    dict(class_cond=True, learn_sigma=False, num_head_channels=8),
    dict(channel_mult="1,2", num_res_blocks=1, attention_resolutions="8", num_head_channels=8),
]


@pytest.mark.parametrize("flags", VARIANTS)
def test_flag_variants_round_trip_through_a_checkpoint(tmp_path, flags):
    base = dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,2,2", attention_resolutions="16,8")
    cfg = {**base, **flags}
    torch.manual_seed(0)
    a = load_backbone("adm:random", **cfg)
    path = tmp_path / "model.pt"
    torch.save(a.model.state_dict(), path)
    inferred = infer_shape_flags(torch.load(path, weights_only=True))
    assert inferred["learn_sigma"] == cfg.get("learn_sigma", False)
    assert inferred["class_cond"] == cfg.get("class_cond", False)
    assert inferred["use_scale_shift_norm"] == cfg.get("use_scale_shift_norm", True)
    assert inferred["resblock_updown"] == cfg.get("resblock_updown", False)
    assert inferred["channel_mult"] == cfg["channel_mult"]
    b = load_backbone(f"adm:{path}", **cfg)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7]) if cfg.get("class_cond") else None
    with torch.inference_mode():
        assert torch.equal(a.model(x, torch.tensor([3, 400]), y), b.model(x, torch.tensor([3, 400]), y))
    assert a.fingerprint() == b.fingerprint()


def _reference_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """guided-diffusion's QKVAttention / QKVAttentionLegacy, written from their formulas."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    scale = 1 / ch**0.25
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (z.reshape(bs * heads, ch, length) for z in (q, k, v))
    else:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_matches_the_reference_formula(new_order):
    from diffprobe.backbones.adm import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, num_head_channels=-1, new_order=new_order)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(2, 64, 16)))
        ref = x.reshape(2, 64, 16) + block.proj_out(_reference_attention(qkv, 4, new_order))
        assert torch.allclose(block(x), ref.reshape(2, 64, 4, 4), atol=1e-5)


def test_flags_from_the_file_name_of_a_released_checkpoint(tmp_path):
    shutil.copy(FIXTURE_CKPT, tmp_path / "256x256_diffusion_uncond.pt")
    with pytest.raises(DiffprobeError, match="does not match preset 256x256_diffusion_uncond"):
        load_backbone(f"adm:{tmp_path / '256x256_diffusion_uncond.pt'}")


def test_inferring_shapes_needs_heads_and_image_size(tmp_path):
    bare = tmp_path / "model.pt"
    shutil.copy(FIXTURE_CKPT, bare)  # no JSON beside it
    with pytest.raises(DiffprobeError, match="image size"):
        load_backbone(f"adm:{bare}")
    with pytest.raises(DiffprobeError, match="num_head_channels"):
        load_backbone(f"adm:{bare}", image_size=32)
    b = load_backbone(f"adm:{bare}", image_size=32, num_head_channels=8)
    with torch.inference_mode():
        out = b.model(EXPECTED["x_t"], EXPECTED["t"])
    assert (out - EXPECTED["out"]).abs().max().item() <= 1e-4


def test_mismatched_flags_name_keys_and_shapes():
    with pytest.raises(DiffprobeError) as err:
        load_backbone(FIXTURE_SPEC, image_size=32, num_channels=64, channel_mult="1,1,2,2", attention_resolutions="16,8,4",
                      num_head_channels=8, learn_sigma=True, resblock_updown=True)  # fmt: skip
    msg = str(err.value)
    assert "input_blocks.0.0.weight: checkpoint [32, 3, 3, 3], model [64, 3, 3, 3]" in msg and len(msg) < 600
    with pytest.raises(DiffprobeError, match=r"keys missing from the checkpoint \(e.g. label_emb.weight"):
        load_backbone(FIXTURE_SPEC, class_cond=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="no_such_model"), "unknown ADM preset 'no_such_model'; known presets: 128x128_diffusion"),
        (dict(num_chanels=64), "unknown guided-diffusion flag"),
        (dict(noise_schedule="quadratic"), "expected linear or cosine"),
        (dict(class_cond="maybe"), "expected True or False"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(DiffprobeError, match=message):
        load_backbone(FIXTURE_SPEC, **kwargs)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(DiffprobeError, match="checkpoint not found"):
        load_backbone(f"adm:{tmp_path / 'nope.pt'}")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(DiffprobeError, match="corrupt or not a PyTorch file"):
        load_backbone(f"adm:{corrupt}")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(DiffprobeError, match=r"Python objects or code \(torch.nn.modules.linear.Linear\).*refused for safety"):
        load_backbone(f"adm:{pickled}")
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(DiffprobeError, match="image size|not an ADM"):
        load_backbone(f"adm:{other}")


def test_block_and_timestep_ranges(fixture_backbone):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(DiffprobeError, match="block 26 is out of range: this adm model has blocks 1..25"):
        fixture_backbone.forward_features(x, 10, [3, 26])
    with pytest.raises(DiffprobeError, match=r"timestep 1000 is outside this model's schedule: expected an integer in \[0, 999\]"):
        fixture_backbone.forward_features(x, 1000, [3])


def test_class_conditional_models_need_labels():
    bb = load_backbone("adm:random", image_size=32, num_channels=32, channel_mult="1,2", attention_resolutions="8",
                       num_head_channels=8, class_cond=True)  # fmt: skip
    with pytest.raises(DiffprobeError, match="class-conditional"):
        bb.forward_features(torch.zeros(1, 3, 32, 32), 10, [3])
    assert bb.forward_features(torch.zeros(1, 3, 32, 32), 10, [3], y=torch.tensor([4]))[3].shape == (1, 32, 32, 32)
