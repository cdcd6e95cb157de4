"""Stable Diffusion-style and DiT-style backbones on tiny random pipelines (offline).

Pipelines are built with diffusers'/transformers' own constructors and saved with
save_pretrained (tests/latent_models.py), then loaded through load_backbone("diffusers:DIR").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from PIL import Image

from diffprobe import load_backbone
from diffprobe.cli import main
from diffprobe.data import open_dataset
from diffprobe.features.extract import extract
from diffprobe.features.latents import LatentCache
from diffprobe.features.plan import FeaturePlan
from diffprobe.features.store import FeatureKey
from diffprobe.precision import choose_compute
from latent_models import save_dit, save_sd

FP32 = choose_compute("cpu", "fp32", False, False)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    return save_dit(tmp_path_factory.mktemp("dit") / "pipe")


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4 * max(b.abs().max().item(), 1e-12)


def _out(o):
    if isinstance(o, tuple):
        return o[0]
    return getattr(o, "sample", o)


def _sd_hook_module(unet, name: str) -> str:
    """Where diffusers computes the output of our unit `name` (the last module of the unit)."""
    if name in ("conv_in", "mid_block") or ".downsamplers." in name:
        return name
    kind, b, _, i = name.split(".")
    block = getattr(unet, kind)[int(b)]
    if kind == "up_blocks" and int(i) == len(block.resnets) - 1 and block.upsamplers is not None:
        return f"{kind}.{b}.upsamplers.0"
    if getattr(block, "attentions", None) is not None:
        return f"{kind}.{b}.attentions.{i}"
    return name


def test_sd_blocks_equal_the_models_own_forward(sd_folder):
    bb = load_backbone(f"diffusers:{sd_folder}", prompt="a cat")
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    x, t = torch.randn(3, *bb.model_shape), torch.tensor([5, 400, 999])
    context = bb.context.expand(3, -1, -1)
    caught = {}
    for b in bb.blocks:
        where = _sd_hook_module(unet, b.name)
        unet.get_submodule(where).register_forward_hook(lambda m, i, o, n=b.index: caught.__setitem__(n, _out(o)))
    with torch.inference_mode():
        feats = bb.forward_features(x, t, "all")
        reference = unet(x, t, encoder_hidden_states=context).sample
        last = feats[bb.num_blocks]
        out = unet.conv_out(unet.conv_act(unet.conv_norm_out(last)))
    assert sorted(caught) == list(range(1, bb.num_blocks + 1))
    for b in bb.blocks:
        assert tuple(feats[b.index].shape[1:]) == (b.channels, b.resolution, b.resolution)
        _close(feats[b.index], caught[b.index])
    _close(out, reference)
    _close(bb.denoise(x, t), reference)


def test_dit_blocks_equal_the_models_own_forward(dit_folder):
    bb = load_backbone(f"diffusers:{dit_folder}")
    model = DiTTransformer2DModel.from_pretrained(dit_folder, subfolder="transformer")
    x, t = torch.randn(2, *bb.model_shape), torch.tensor([3, 700])
    null = torch.full((2,), 10)
    caught = {}
    names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(4)]
    for index, name in enumerate(names, start=1):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=index: caught.__setitem__(n, o))
    with torch.inference_mode():
        feats = bb.forward_features(x, t, "all")
        reference = model(x, timestep=t, class_labels=null).sample
        labelled = bb.forward_features(x, t, [3], y=torch.tensor([1, 2]))[3]
    assert [b.name for b in bb.blocks] == names
    for b in bb.blocks:
        tokens = caught[b.index]  # [B, N, D], row-major patches
        _close(feats[b.index], tokens.transpose(1, 2).reshape(2, b.channels, b.resolution, b.resolution))
    _close(bb.denoise(x, t), reference)
    assert bb.learned_sigma and reference.shape[1] == 2 * bb.in_channels
    assert bb.bottleneck_block is None and bb.default_class_label == 10 == bb.num_classes
    assert not torch.equal(labelled, feats[3])  # a class label changes the features
    conditioned = load_backbone(f"diffusers:{dit_folder}", class_label="2")
    assert torch.equal(conditioned.forward_features(x, t, [3])[3], bb.forward_features(x, t, [3], y=torch.tensor([2, 2]))[3])
    assert conditioned.fingerprint() != bb.fingerprint()


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_early_exit_equals_the_full_walk(family, sd_folder, dit_folder):
    bb = load_backbone(f"diffusers:{sd_folder if family == 'sd' else dit_folder}")
    x, t = torch.randn(2, *bb.model_shape), torch.tensor([50, 500])
    with torch.inference_mode():
        full = bb.forward_features(x, t, "all")
        deeper = bb.model.get_submodule(bb.blocks[-1].name if family == "dit" else "conv_out")
        calls = []
        handle = deeper.register_forward_hook(lambda *a: calls.append(1))
        for k in (1, 3, bb.num_blocks - 1):
            early = bb.forward_features(x, t, [k])
            assert list(early) == [k] and torch.equal(early[k], full[k])
        handle.remove()
    assert not calls  # nothing past the deepest wanted block ran


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_features_do_not_depend_on_batch_or_rerun_and_latents_are_cached(family, sd_folder, dit_folder, cifar_small, tmp_path):
    spec = f"diffusers:{sd_folder if family == 'sd' else dit_folder}"
    data = open_dataset(cifar_small)
    bb = load_backbone(spec)
    encoded = []
    encode = bb.encode
    bb.encode = lambda images: (encoded.append(len(images)), encode(images))[1]
    common = dict(limit=12, dtype="float32", compute=FP32, progress=False)
    one, two = FeaturePlan(t=(10,), blocks=(2, 4), pools=(1, 2)), FeaturePlan(t=(10, 300), blocks=(2, 4), pools=(1, 2))
    a = extract(bb, data, one, tmp_path / "a", batch_size=4, **common)
    assert sum(encoded) == 12 and (tmp_path / "a" / "latents" / "latents.json").is_file()
    extract(bb, data, two, tmp_path / "a", batch_size=4, **common)  # a new timestep: latents from the cache
    assert sum(encoded) == 12
    b = extract(load_backbone(spec), data, two, tmp_path / "b", batch_size=5, **common)
    rerun = extract(load_backbone(spec), data, two, tmp_path / "c", batch_size=4, **common)
    assert a.complete_keys() == b.complete_keys() == rerun.complete_keys() and len(a.complete_keys()) == 8
    for key in a.complete_keys():
        np.testing.assert_allclose(a.load(key), b.load(key), rtol=1e-5, atol=1e-5)
        assert np.array_equal(a.load(key), rerun.load(key))
    # Cached latents are exactly the encoder's output; another encoder's cache is discarded.
    cache = LatentCache.open(bb, a)
    assert cache.done().all() and cache.identity["shape"] == [12, *bb.model_shape]
    info = json.loads((tmp_path / "a" / "latents" / "latents.json").read_text())
    info["encoder"] = "someone-else"
    (tmp_path / "a" / "latents" / "latents.json").write_text(json.dumps(info))
    assert not LatentCache.open(bb, a).done().any()


def _family_pipeline(spec: str, cifar_small, tmp_path, capsys) -> None:
    """blocks, sweep (with controls), probe, cka, predict and transfer on one latent model via the CLI."""
    assert main(["blocks", spec]) == 0
    table = capsys.readouterr().out
    assert "latents" in table and "resolution" in table
    sweep = tmp_path / "sweep"
    common = ["--data", str(cifar_small), "--limit", "40", "--batch-size", "20", "--precision", "fp32"]
    assert main(["sweep", spec, *common, "--out", str(sweep), "--blocks", "2,4", "--t", "10,200",
                 "--probe", "knn"]) == 0  # fmt: skip (kNN: the L-BFGS probe is the slow part, and not what is tested)
    summary = json.loads((sweep / "summary.json").read_text())
    assert "controls" in summary
    store = sweep / "features"
    assert (store / "latents" / "latents.npy").is_file()
    assert main(["probe", str(store), "--t", "10", "--block", "4", "--out", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert main(["cka", "--a", str(store), "--out", str(tmp_path / "cka"), "--batch-size", "20"]) == 0
    images = []
    for i, path in enumerate(sorted(p for p in cifar_small.rglob("*") if p.is_file())[:2]):
        target = tmp_path / f"img{i}.png"
        Image.open(path).convert("RGB").resize((40, 30)).save(target)
        images.append(str(target))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), *images, "--json", "--top-k", "2"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 2 and len(predictions[0]["top"]) == 2
    assert main(["transfer", spec, "--datasets", str(cifar_small), "--out", str(tmp_path / "transfer"), "--t", "10",
                 "--blocks", "4", "--limit", "40", "--batch-size", "20", "--precision", "fp32", "--no-controls", "--probe", "knn"]) == 0  # fmt: skip
    assert (tmp_path / "transfer" / "transfer.csv").is_file()
    # Sampling: the denoiser in latent space, then the VAE's decoder.
    assert main(["sample", spec, "--out", str(tmp_path / "samples"), "--num", "2", "--steps", "2", "--batch-size", "2",
                 "--precision", "fp32"]) == 0  # fmt: skip
    assert np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_sd_shaped_model_through_the_cli(sd_folder, cifar_small, tmp_path, capsys):
    _family_pipeline(f"diffusers:{sd_folder}", cifar_small, tmp_path, capsys)


def test_dit_shaped_model_through_the_cli(dit_folder, cifar_small, tmp_path, capsys):
    _family_pipeline(f"diffusers:{dit_folder}", cifar_small, tmp_path, capsys)
    # --class-label K conditions on class K; the store records it.
    store = tmp_path / "k3"
    assert main(["extract", f"diffusers:{dit_folder}", "--data", str(cifar_small), "--limit", "20", "--blocks", "3",
                 "--t", "10", "--class-label", "3", "--out", str(store)]) == 0  # fmt: skip
    assert json.loads((store / "manifest.json").read_text())["backbone"]["class_label"] == 3
    assert FeatureKey(10, 3, 1).stem in (p.stem for p in (store / "features").glob("*.npy"))


def test_prompt_is_encoded_once_and_is_part_of_the_identity(sd_folder, monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path))  # no encoded prompt cached by other tests
    calls = []
    forward = transformers.CLIPTextModel.forward
    monkeypatch.setattr(transformers.CLIPTextModel, "forward", lambda self, *a, **k: (calls.append(1), forward(self, *a, **k))[1])
    empty = load_backbone(f"diffusers:{sd_folder}")
    cat = load_backbone(f"diffusers:{sd_folder}", prompt="a cat")
    assert len(calls) == 2
    x = torch.randn(2, *empty.model_shape)
    with torch.inference_mode():
        for _ in range(3):
            empty.forward_features(x, 10, [2])
    assert len(calls) == 2  # not per batch
    assert empty.fingerprint() != cat.fingerprint() and empty.config["prompt"] == ""
    assert not torch.equal(empty.forward_features(x, 10, [2])[2], cat.forward_features(x, 10, [2])[2])


def test_image_size_override_and_vae_encoding(sd_folder):
    bb = load_backbone(f"diffusers:{sd_folder}", image_size=32)
    assert bb.image_size == 32 and bb.model_shape == (4, 16, 16)
    assert [b.resolution for b in bb.blocks][:3] == [16, 16, 8]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = bb.encode(images)
    reference = bb.codec.vae.encode(images).latent_dist.mean * bb.codec.vae.config.scaling_factor
    assert torch.allclose(latents, reference) and torch.equal(latents, bb.encode(images))  # deterministic: the mean
    assert bb.decode(latents).shape == (2, 3, 32, 32)
    assert bb.config["vae"]["encoding"] == "posterior mean"


def test_a_dit_saved_as_the_generic_transformer2dmodel_is_read_as_dit(dit_folder, tmp_path):
    """facebook/DiT-XL-2-256's config still names Transformer2DModel (diffusers remaps it by norm_type)."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(dit_folder, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"]}))
    old, new = load_backbone(f"diffusers:{folder}"), load_backbone(f"diffusers:{dit_folder}")
    assert old.family == "dit" and old.fingerprint() != "" and old.block_table() == new.block_table()


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_bad_inputs_are_one_clear_line(sd_folder, dit_folder, tmp_path, capsys):
    other = tmp_path / "other" / "unet"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"_class_name": "UNetSpatioTemporalConditionModel"}))  # a video U-Net
    err = _error(["blocks", f"diffusers:{other.parent}"], capsys)
    assert "holds a UNetSpatioTemporalConditionModel, which diffprobe cannot read" in err
    assert all(name in err for name in ("PixArtTransformer2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"))

    no_vae = save_sd(tmp_path / "novae", vae_dir=False)
    no_text = save_sd(tmp_path / "notext", text_encoder=False)
    sdxl = save_sd(tmp_path / "sdxl", addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8)  # fmt: skip
    capsys.readouterr()  # building the folders prints progress bars
    assert "no vae/ folder" in _error(["blocks", f"diffusers:{no_vae}"], capsys)
    assert "no text_encoder/ folder" in _error(["blocks", f"diffusers:{no_text}"], capsys)

    err = _error(["blocks", f"diffusers:{dit_folder}", "--prompt", "a cat"], capsys)
    assert "class-conditional" in err and "class_label" in err
    err = _error(["blocks", f"diffusers:{sd_folder}", "--image-size", "22"], capsys)
    assert "not a multiple of 4" in err
    err = _error(["blocks", f"diffusers:{dit_folder}", "-o", "image_size=18"], capsys)
    assert "not a multiple of 4" in err
    err = _error(["blocks", "diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5"], capsys)
    assert "not a local folder" in err and "huggingface-cli download" in err and "diffusers:DIR" in err
    err = _error(["blocks", f"diffusers:{dit_folder}", "-o", "class_label=11"], capsys)
    assert "outside 0..9" in err
    err = _error(["blocks", f"diffusers:{sd_folder}", "-o", "preset=x"], capsys)
    assert "does not apply" in err
    assert "has no text_encoder_2/ folder: a SDXL-style" in _error(["blocks", f"diffusers:{sdxl}"], capsys)


def test_v_prediction_comes_from_the_scheduler_config(sd_folder, tmp_path):
    import shutil

    from diffprobe.generate.sample import make_scheduler

    folder = tmp_path / "v"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    bb = load_backbone(f"diffusers:{folder}")
    assert bb.prediction_type == "v_prediction" and load_backbone(f"diffusers:{sd_folder}").prediction_type == "epsilon"
    scheduler = make_scheduler(bb, "ddim", bb.learned_sigma)
    assert scheduler.config.prediction_type == "v_prediction" and not scheduler.config.clip_sample


def test_a_flow_model_samples_with_the_euler_flow_scheduler(dit_folder, monkeypatch):
    """Sampling a flow-parameterized model: FlowMatchEulerDiscreteScheduler with the recorded
    shift, real-valued timesteps handed to the denoiser, DDPM samplers refused in one line. (The
    transformer here is DiT-shaped; only the schedule's wiring is under test.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffprobe import DiffprobeError
    from diffprobe.features.noise import FlowSchedule
    from diffprobe.generate.sample import sample_images

    backbone = load_backbone(f"diffusers:{dit_folder}")
    backbone.schedule = FlowSchedule(1000, {"shift": 3.0})
    seen = []
    denoise = backbone.denoise
    monkeypatch.setattr(type(backbone), "denoise", lambda self, x, t, y=None: seen.append(t[0].item()) or denoise(x, t, y)[:, :4])
    images = sample_images(backbone, 2, "euler", 3, seed=1)
    assert images.shape == (2, 3, backbone.image_size, backbone.image_size) and images.dtype == torch.uint8
    expected = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    expected.set_timesteps(3)
    assert seen == pytest.approx(expected.timesteps.tolist()) and seen[1] != int(seen[1])  # shifted, not rounded
    with pytest.raises(DiffprobeError, match="a flow model samples with euler"):
        sample_images(backbone, 1, "ddim", 3)
