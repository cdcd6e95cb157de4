"""diffusers UNet2DModel backbones: numbering, parity with the model's own forward, extraction."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffprobe import DiffprobeError, load_backbone
from diffprobe.cli import main
from diffprobe.features.store import FeatureStore


def save_unet(folder, pipeline: bool = True, **overrides) -> str:
    torch.manual_seed(0)
    cfg = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
               norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    cfg.update(overrides)
    model = UNet2DModel(**cfg)
    if pipeline:
        model.save_pretrained(folder / "unet")
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    else:
        model.save_pretrained(folder)
    return str(folder)


def test_block_numbering_and_schedule(tmp_path):
    bb = load_backbone(f"diffusers:{save_unet(tmp_path)}")
    names = [b.name for b in bb.blocks]
    assert names == ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0",
                     "mid_block", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0",
                     "up_blocks.1.resnets.1"]  # fmt: skip
    assert [(b.channels, b.resolution) for b in bb.blocks][2:5] == [(32, 16), (64, 16), (64, 16)]
    assert bb.schedule.name.startswith("diffusers-squaredcos_cap_v2")
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy()
    assert abs(bb.schedule.alphas_cumprod - ref).max() < 1e-12


@pytest.mark.parametrize("variant", [
    {},
    dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5,
         resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet", center_input_sample=True),
])  # fmt: skip
def test_unrolled_forward_equals_the_model(tmp_path, variant):
    folder = save_unet(tmp_path, **variant)
    bb = load_backbone(f"diffusers:{folder}")
    model = UNet2DModel.from_pretrained(folder, subfolder="unet")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    y = torch.tensor([1, 4]) if bb.num_classes else None
    caught = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: caught.__setitem__(n, o))
             for name in ("conv_in", "mid_block")]  # fmt: skip
    with torch.inference_mode():
        feats = bb.forward_features(x, t, "all", y=y)
        reference = model(x, t, class_labels=y).sample
        last = feats[bb.num_blocks]
        out = model.conv_out(model.conv_act(model.conv_norm_out(last)))
        early = bb.forward_features(x, t, [2], y=y)
    for h in hooks:
        h.remove()
    assert torch.allclose(out, reference, atol=1e-5)
    mid = [b.index for b in bb.blocks if b.name == "mid_block"][0]
    assert torch.allclose(feats[mid], caught["mid_block"], atol=1e-6) and torch.allclose(feats[1], caught["conv_in"])
    assert torch.equal(early[2], feats[2])


def test_model_folder_without_scheduler_needs_the_schedule_named(tmp_path):
    folder = save_unet(tmp_path / "m", pipeline=False)
    with pytest.raises(DiffprobeError, match="no scheduler/scheduler_config.json.*-o schedule=linear"):
        load_backbone(f"diffusers:{folder}")  # was: DDPM's linear schedule assumed, with a warning
    assert load_backbone(f"diffusers:{folder}", schedule="linear").schedule.name == "linear-1000"
    assert load_backbone(f"diffusers:{folder}", schedule="cosine").schedule.name == "cosine-1000"
    sd = load_backbone(f"diffusers:{folder}", schedule="scaled_linear").schedule
    assert sd.name == "diffusers-scaled_linear-1000"
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double().numpy()
    assert abs(sd.alphas_cumprod - ref).max() < 1e-12
    with pytest.raises(DiffprobeError, match="schedule='sqrt' is not known"):
        load_backbone(f"diffusers:{folder}", schedule="sqrt")


def test_bad_diffusers_inputs(tmp_path):
    with pytest.raises(DiffprobeError, match="cannot load diffusers model 'someone/missing-model'"):
        load_backbone("diffusers:someone/missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffprobeError, match="has no config.json"):
        load_backbone(f"diffusers:{tmp_path / 'empty'}")
    folder = save_unet(tmp_path / "skip", down_block_types=("DownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "UpBlock2D"), norm_num_groups=32, block_out_channels=(32, 32))  # fmt: skip
    with pytest.raises(DiffprobeError, match="SkipDownBlock2D.*not supported"):
        load_backbone(f"diffusers:{folder}")


def test_cli_extracts_with_a_diffusers_model(tmp_path, cifar_small, capsys):
    folder = save_unet(tmp_path / "model")
    out = tmp_path / "store"
    code = main(["extract", f"diffusers:{folder}", "--data", str(cifar_small), "--blocks", "5,7", "--t", "50,200",
                 "--pool", "1,2", "--limit", "60", "--out", str(out)])  # fmt: skip
    assert code == 0
    store = FeatureStore.open(out)
    assert len(store.complete_keys()) == 8 and store.manifest["backbone"]["family"] == "diffusers"
    assert store.load(store.complete_keys()[0]).shape == (60, 64)
