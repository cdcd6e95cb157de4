"""SDXL-shaped pipelines (issue 22): a tiny random text_time UNet2DConditionModel with two CLIP
encoders, read block by block and module by module against diffusers' own forward, conditioned
as StableDiffusionXLPipeline conditions it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from conftest import ROOT  # noqa: F401  (tests/ on the path: latent_models)
from diffprobe import DiffprobeError, load_backbone
from diffprobe.cli import main
from latent_models import save_sdxl
from test_latent_backbones import _close, _out, _sd_hook_module

INNER = ["down_blocks.1.attentions.0.transformer_blocks.1.attn1",  # self-attention output, second layer
         "down_blocks.1.attentions.0.transformer_blocks.0.ff",  # feed-forward output
         "up_blocks.0.attentions.1.transformer_blocks.0.attn2",  # cross-attention output
         "up_blocks.0.resnets.1"]  # a resnet inside an up block  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


def test_sdxl_blocks_and_inner_modules_equal_diffusers_own_forward(sdxl_folder):
    """Every block, and attention, feed-forward and resnet outputs inside blocks, equal diffusers'
    UNet2DConditionModel forward (with the pipeline's added text_time conditioning) caught with hooks."""
    bb = load_backbone(f"diffusers:{sdxl_folder}", prompt="a red boat").eval()
    unet = UNet2DConditionModel.from_pretrained(sdxl_folder, subfolder="unet").eval()
    caught: dict = {}

    def catch(key):  # a hook that returns nothing (a returned value would replace the module's output)
        return lambda m, i, o: caught.__setitem__(key, caught.get(key, _out(o)))

    for b in bb.blocks:
        unet.get_submodule(_sd_hook_module(unet, b.name)).register_forward_hook(catch(b.index))
    for path in INNER:
        unet.get_submodule(path).register_forward_hook(catch(path))
    torch.manual_seed(0)
    x, t = torch.randn(2, *bb.model_shape), torch.tensor([10, 700])
    added = {"text_embeds": bb.text_embeds.expand(2, -1), "time_ids": bb.time_ids.expand(2, -1)}
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=bb.context.expand(2, -1, -1), added_cond_kwargs=added).sample
        ours = bb.forward_features(x, t, "all")
        inner = bb.forward_features(x, t, INNER)
    for b in bb.blocks:
        _close(ours[b.index], caught[b.index])
    for path in INNER:
        theirs = caught[path]
        if theirs.ndim == 3:
            side = int(theirs.shape[1] ** 0.5)
            theirs = theirs.transpose(1, 2).reshape(2, -1, side, side)
        _close(inner[path], theirs)
    with torch.no_grad():
        _close(bb.denoise(x, t), reference)
    assert bb.bottleneck_block == 5 and bb.family == "stable-diffusion-xl"


def test_sdxl_conditioning_is_the_pipelines_own(sdxl_folder, tmp_path):
    """The prompt as StableDiffusionXLPipeline.encode_prompt encodes it (both encoders' penultimate
    states, the second's pooled projection); time ids as _get_add_time_ids makes them; the empty
    prompt as the pipeline's unconditional input: zeros where force_zeros_for_empty_prompt says so."""
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a red boat", do_classifier_free_guidance=True)
    bb = load_backbone(f"diffusers:{sdxl_folder}", prompt="a red boat")
    _close(bb.context, embeds.detach())
    _close(bb.text_embeds, pooled.detach())
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=pooled.shape[-1])
    assert torch.equal(bb.time_ids, ids)
    empty = load_backbone(f"diffusers:{sdxl_folder}")
    assert torch.equal(empty.context, negative) and torch.equal(empty.text_embeds, negative_pooled) and not empty.context.any()
    plain = save_sdxl(tmp_path / "no-zeros", force_zeros=False)
    unzeroed = load_backbone(f"diffusers:{plain}")
    pipe = StableDiffusionXLPipeline.from_pretrained(plain)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
    _close(unzeroed.context, theirs.detach())
    _close(unzeroed.text_embeds, theirs_pooled.detach())
    assert unzeroed.fingerprint() != empty.fingerprint()


def test_sdxl_bad_pipelines_are_one_line(sdxl_folder, tmp_path):
    missing = tmp_path / "no-clip-g"
    shutil.copytree(sdxl_folder, missing)
    shutil.rmtree(missing / "text_encoder_2")
    with pytest.raises(DiffprobeError, match="has no text_encoder_2/ folder: a SDXL-style UNet2DConditionModel pipeline folder needs .*text_encoder_2/"):
        load_backbone(f"diffusers:{missing}")
    refiner = save_sdxl(tmp_path / "refiner", refiner=True)
    with pytest.raises(DiffprobeError, match="is an SDXL refiner"):
        load_backbone(f"diffusers:{refiner}")
    with pytest.raises(DiffprobeError, match="conditioned on a prompt, not a class label"):
        load_backbone(f"diffusers:{sdxl_folder}", class_label=3)


def test_sdxl_through_the_cli(sdxl_folder, cifar_small, tmp_path, capsys):
    spec = f"diffusers:{sdxl_folder}"
    assert main(["blocks", spec]) == 0
    out = capsys.readouterr().out
    assert "stable-diffusion-xl" in out and "time ids: original 16×16, crop (0, 0), target 16×16" in out
    sweep = tmp_path / "sweep"
    assert main(["sweep", spec, "--data", str(cifar_small), "--blocks", f"5,{INNER[1]}", "--t", "100,500", "--pool", "1",
                 "--limit", "100", "--out", str(sweep)]) == 0  # fmt: skip
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["controls"]["random_weights"]["report"]["rows"] == summary["roles"]["report"] > 0
    assert main(["sample", spec, "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2"]) == 0


def test_a_second_load_encodes_no_prompt(sdxl_folder, monkeypatch, tmp_path):
    """The encoded prompt is cached by encoder identity and prompt: a rerun (a resume, another
    timestep) loads no text encoder; another prompt, or an encoder file that changed, encodes again."""
    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    first = load_backbone(f"diffusers:{sdxl_folder}", prompt="a red boat")
    assert len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 1
    loads = []
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for cls in (CLIPTextModel, CLIPTextModelWithProjection):
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, _o=original, **k: loads.append(c.__name__) or _o(c, *a, **k)))
    again = load_backbone(f"diffusers:{sdxl_folder}", prompt="a red boat")
    assert loads == [] and torch.equal(again.context, first.context) and again.fingerprint() == first.fingerprint()
    load_backbone(f"diffusers:{sdxl_folder}", prompt="a blue boat")
    assert sorted(loads) == ["CLIPTextModel", "CLIPTextModelWithProjection"]
