"""PixArt-shaped pipelines (issue 22): a tiny random PixArtTransformer2DModel with a T5 encoder, read
block by block and module by module against diffusers' own forward, conditioned as the PixArt-α
and -Σ pipelines condition it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

from conftest import ROOT  # noqa: F401  (tests/ on the path: latent_models)
from diffprobe import DiffprobeError, load_backbone
from diffprobe.cli import main
from latent_models import save_pixart
from test_latent_backbones import _close

INNER = ["transformer_blocks.0.attn2", "transformer_blocks.1.ff"]  # cross-attention and feed-forward outputs


@pytest.fixture(scope="module")
def alpha_folder(tmp_path_factory):
    return save_pixart(tmp_path_factory.mktemp("pixart") / "alpha")


def test_pixart_blocks_equal_diffusers_own_forward(alpha_folder):
    """Every block and two inner modules, caught with hooks on PixArtTransformer2DModel's own forward
    (prompt mask, α's resolution and aspect-ratio conditions as the pipeline passes them), equal
    diffprobe's maps; the full output equals denoise."""
    bb = load_backbone(f"diffusers:{alpha_folder}", prompt="a red boat").eval()
    model = PixArtTransformer2DModel.from_pretrained(alpha_folder, subfolder="transformer").eval()
    caught: dict = {}
    names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(2)] + INNER
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: caught.__setitem__(name, caught.get(name, o)))
    torch.manual_seed(0)
    x, t = torch.randn(2, *bb.model_shape), torch.tensor([20, 900])
    added = {"resolution": torch.tensor([[16.0, 16.0]]).repeat(2, 1), "aspect_ratio": torch.tensor([[1.0]]).repeat(2, 1)}
    with torch.no_grad():
        reference = model(x, encoder_hidden_states=bb.prompt_embeds.expand(2, -1, -1), encoder_attention_mask=bb.prompt_mask.expand(2, -1),
                          timestep=t, added_cond_kwargs=added).sample  # fmt: skip
        ours = bb.forward_features(x, t, "all")
        inner = bb.forward_features(x, t, INNER)
        _close(bb.denoise(x, t), reference)
    for index, name in enumerate(names[:3], start=1):
        tokens = caught[name]
        _close(ours[index], tokens.transpose(1, 2).reshape(2, -1, 4, 4))
    for name in INNER:
        _close(inner[name], caught[name].transpose(1, 2).reshape(2, -1, 4, 4))
    assert bb.learned_sigma and bb.config["additional_conditions"]


def test_pixart_conditioning_is_the_pipelines_own(alpha_folder, tmp_path):
    """T5's states and mask as PixArtAlphaPipeline.encode_prompt gives them (120 tokens), and as
    PixArtSigmaPipeline's (300 tokens, no size conditions); max_sequence_length changes the length."""
    for folder, pipeline, tokens in ((alpha_folder, PixArtAlphaPipeline, 120), (save_pixart(tmp_path / "sigma", sigma=True), PixArtSigmaPipeline, 300)):
        pipe = pipeline.from_pretrained(folder)
        embeds, mask, _, _ = pipe.encode_prompt("a red boat", do_classifier_free_guidance=False, clean_caption=False)
        bb = load_backbone(f"diffusers:{folder}", prompt="a red boat")
        assert bb.prompt_embeds.shape[1] == tokens and torch.equal(bb.prompt_mask, mask.long())
        _close(bb.prompt_embeds, embeds.detach())
    assert not bb.config["additional_conditions"]
    short = load_backbone(f"diffusers:{alpha_folder}", prompt="a red boat", max_sequence_length="32")
    assert short.prompt_embeds.shape[1] == 32 and short.fingerprint() != load_backbone(f"diffusers:{alpha_folder}", prompt="a red boat").fingerprint()


def test_pixart_bad_input_is_one_line(alpha_folder, tmp_path):
    missing = tmp_path / "no-t5"
    shutil.copytree(alpha_folder, missing)
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(DiffprobeError, match="has no text_encoder/ folder: a PixArtTransformer2DModel pipeline folder needs"):
        load_backbone(f"diffusers:{missing}")
    with pytest.raises(DiffprobeError, match="conditioned on a prompt, not a class label"):
        load_backbone(f"diffusers:{alpha_folder}", class_label=3)
    with pytest.raises(DiffprobeError, match="gives .*not a map"):
        load_backbone(f"diffusers:{alpha_folder}").resolve_blocks(["caption_projection"])  # the prompt's tokens


def test_pixart_through_the_cli(alpha_folder, cifar_small, tmp_path, capsys):
    spec = f"diffusers:{alpha_folder}"
    assert main(["blocks", spec]) == 0
    assert "pixart" in capsys.readouterr().out
    sweep = tmp_path / "sweep"
    assert main(["sweep", spec, "--data", str(cifar_small), "--blocks", f"2,{INNER[1]}", "--t", "100,500", "--pool", "1",
                 "--limit", "100", "--out", str(sweep)]) == 0  # fmt: skip
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["controls"]["random_weights"]["report"]["rows"] == summary["roles"]["report"] > 0
    assert main(["sample", spec, "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2"]) == 0
