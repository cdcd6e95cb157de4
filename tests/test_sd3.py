"""Stable Diffusion 3-shaped pipelines (issue 21): a tiny random MMDiT with two CLIP encoders and T5,
built with diffusers' and transformers' own constructors, read block by block against diffusers' own
forward, conditioned as the pipeline's own encode_prompt conditions it, noised by rectified flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT  # noqa: F401  (tests/ on the path: latent_models)
from diffprobe import load_backbone
from diffprobe.cli import main
from diffprobe.features.noise import FlowSchedule
from latent_models import save_sd3


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


def test_sd3_blocks_equal_diffusers_own_forward(sd3_folder):
    """Every block's image stream, caught with hooks on SD3Transformer2DModel's own forward, equals
    what diffprobe returns for it, within 1e-4 of the tensor's largest value. The reference is
    diffusers' own from_pretrained (diffprobe reads the same files block by block)."""
    from diffusers import SD3Transformer2DModel

    bb = load_backbone(f"diffusers:{sd3_folder}").eval()
    model = SD3Transformer2DModel.from_pretrained(sd3_folder, subfolder="transformer").eval()
    caught = {}
    hooks = [model.pos_embed.register_forward_hook(lambda m, i, o: caught.__setitem__(1, o))]
    for n, block in enumerate(model.transformer_blocks, start=2):
        hooks.append(block.register_forward_hook(lambda m, i, o, n=n: caught.__setitem__(n, o[1])))
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 16, 8, 8), torch.tensor([250.0, 250.0])
    with torch.no_grad():
        model(x_t, encoder_hidden_states=bb.prompt_embeds.expand(2, -1, -1), pooled_projections=bb.pooled_projections.expand(2, -1),
              timestep=t)  # fmt: skip
        ours = bb.forward_features(x_t, t, "all")
    for h in hooks:
        h.remove()
    assert sorted(ours) == sorted(caught) == list(range(1, 2 + len(model.transformer_blocks)))
    for n, tokens in caught.items():
        expected = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        assert torch.allclose(ours[n], expected, atol=1e-4 * expected.abs().max().item()), n
    with torch.no_grad():  # early exit: block 2 alone equals block 2 of the full walk
        assert torch.equal(bb.forward_features(x_t, t, [2])[2], ours[2])


def test_sd3_conditioning_is_the_pipelines_own_encode_prompt(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    for prompt in ("", "a photo of a cat"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
        bb = load_backbone(f"diffusers:{sd3_folder}", prompt=prompt)
        for ours, theirs in ((bb.prompt_embeds, embeds), (bb.pooled_projections, pooled)):
            assert ours.shape == theirs.shape and torch.allclose(ours, theirs.detach(), atol=1e-4 * theirs.abs().max().item())
    no_t5 = load_backbone(f"diffusers:{sd3_folder}", t5="false")
    clip_tokens, clip_width = 16, 16 + 24  # CLIP-L and CLIP-G states side by side, padded to T5's 48
    assert no_t5.prompt_embeds.shape == (1, clip_tokens + 256, 48)
    assert no_t5.prompt_embeds[:, :clip_tokens, :clip_width].any() and not no_t5.prompt_embeds[:, clip_tokens:].any()  # T5: zeros
    assert not no_t5.prompt_embeds[:, :clip_tokens, clip_width:].any()
    assert no_t5.fingerprint() != load_backbone(f"diffusers:{sd3_folder}").fingerprint()
    assert "T5 left out" in no_t5.conditioning


def test_sd3_noise_is_rectified_flow_and_t_is_the_transformers_timestep(sd3_folder):
    bb = load_backbone(f"diffusers:{sd3_folder}")
    assert isinstance(bb.schedule, FlowSchedule) and bb.schedule.sampling["shift"] == 3.0
    assert bb.schedule.check_timesteps([0, 1000]) == [0, 1000]
    assert bb.config["parameterization"] == "flow"


def test_sd3_through_the_cli(sd3_folder, cifar_small, tmp_path, capsys):
    """blocks says flow and what t means; a sweep with its controls, a probe and sample run; a t
    outside 0..T is one line."""
    spec = f"diffusers:{sd3_folder}"
    assert main(["blocks", spec]) == 0
    out = capsys.readouterr().out
    assert "(flow)" in out and "σ = t/1000" in out and "shift=3.0" in out and "transformer_blocks.2" in out
    sweep = tmp_path / "sweep"
    assert main(["sweep", spec, "--data", str(cifar_small), "--blocks", "1,3", "--t", "100,600", "--pool", "1", "--limit", "100",
                 "--out", str(sweep)]) == 0  # fmt: skip
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["controls"]["random_weights"]["report"]["rows"] == summary["roles"]["report"] > 0
    manifest = json.loads((sweep / "features" / "manifest.json").read_text())
    assert manifest["noise"]["parameterization"] == "flow" and manifest["noise"]["schedule"] == "flow-1000"
    assert main(["probe", str(sweep / "features"), "--t", "100", "--blocks", "3", "--pool", "1", "--epochs", "2",
                 "--out", str(tmp_path / "probe")]) == 0  # fmt: skip
    image = sorted((cifar_small / "ship").iterdir())[0]
    assert main(["predict", str(tmp_path / "probe"), str(image), "--top-k", "2"]) == 0  # the run reloads the SD3 backbone
    assert f"{image}:" in capsys.readouterr().out
    assert main(["sample", spec, "--out", str(tmp_path / "samples"), "--num", "2", "--steps", "2"]) == 0
    info = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert info["sampler"] == "euler" and np.load(tmp_path / "samples" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    capsys.readouterr()
    assert main(["extract", spec, "--data", str(cifar_small), "--blocks", "2", "--t", "1001", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside this flow model's schedule" in err


def test_sd3_missing_parts_and_options_are_one_line(sd3_folder, tmp_path):
    import shutil

    from diffprobe import DiffprobeError

    partial = tmp_path / "no-clip-g"
    shutil.copytree(sd3_folder, partial)
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(DiffprobeError, match="has no text_encoder_2/ folder: a SD3Transformer2DModel pipeline folder needs"):
        load_backbone(f"diffusers:{partial}")
    with pytest.raises(DiffprobeError, match="t5='maybe': expected true or false"):
        load_backbone(f"diffusers:{sd3_folder}", t5="maybe")
    with pytest.raises(DiffprobeError, match="conditioned on a prompt, not a class label"):
        load_backbone(f"diffusers:{sd3_folder}", class_label=3)


def test_sd3_reads_blocks_as_passes_need_them(sd3_folder):
    """Loading reads the embeddings only; a pass to block 2 reads block 2 and nothing deeper; the
    output head is read when sampling first needs it; up_to_block caps the depth with one identity."""
    lazy = load_backbone(f"diffusers:{sd3_folder}").eval()
    assert len(lazy.model.transformer_blocks) == 0 and lazy.model.norm_out is None
    x_t, t = torch.randn(2, 16, 8, 8), torch.tensor([600, 600])
    with torch.no_grad():
        early = lazy.forward_features(x_t, t, [2])[2]
        assert len(lazy.model.transformer_blocks) == 1 and lazy.model.norm_out is None
        assert sum(p.numel() for p in lazy.model.parameters()) == lazy.weights_to(2)
        lazy.denoise(x_t, t)  # sampling reads the rest
        assert len(lazy.model.transformer_blocks) == lazy.num_blocks - 1 and lazy.model.norm_out is not None
        assert torch.equal(lazy.forward_features(x_t, t, [2])[2], early)
    capped = load_backbone(f"diffusers:{sd3_folder}", up_to_block=2).eval()
    with torch.no_grad():
        assert torch.equal(capped.forward_features(x_t, t, [2])[2], early)
    assert capped.fingerprint() == lazy.fingerprint()
