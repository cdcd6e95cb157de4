"""FLUX.1-shaped pipelines (issue 21): a tiny random FluxTransformer2DModel (double- and single-stream
blocks, rotary position ids, guidance embedding) with CLIP and T5, read block by block against
diffusers' own forward, conditioned as FluxPipeline.encode_prompt conditions it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT  # noqa: F401  (tests/ on the path: latent_models)
from diffprobe import DiffprobeError, load_backbone
from diffprobe.backbones.diffusers_flux import image_ids, pack, unpack
from diffprobe.cli import main
from latent_models import save_flux

SIZE = "16"  # 16-px images: 8×8 latents, 4×4 packed tokens


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_flux(tmp_path_factory.mktemp("flux") / "pipe")


def test_packing_is_the_pipelines(flux_folder):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack(pack(latents), 8, 6), latents)
    assert torch.equal(image_ids(8, 6, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32))  # fmt: skip


def test_flux_blocks_equal_diffusers_own_forward(flux_folder):
    """Double- then single-stream blocks: each block's image tokens, caught with hooks on
    FluxTransformer2DModel's own forward (as FluxPipeline calls it: σ = t/1000, guidance 3.5), equal
    diffprobe's maps within 1e-4 of the tensor's largest value; early exit equals the full walk. The
    reference is diffusers' own from_pretrained (diffprobe reads the same files block by block)."""
    from diffusers import FluxTransformer2DModel

    bb = load_backbone(f"diffusers:{flux_folder}", image_size=SIZE).eval()
    model = FluxTransformer2DModel.from_pretrained(flux_folder, subfolder="transformer").eval()
    caught = {}
    hooks = [model.x_embedder.register_forward_hook(lambda m, i, o: caught.__setitem__(1, o))]
    for n, block in enumerate([*model.transformer_blocks, *model.single_transformer_blocks], start=2):
        hooks.append(block.register_forward_hook(lambda m, i, o, n=n: caught.__setitem__(n, o[1])))
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        model(pack(x_t), timestep=t / 1000, guidance=torch.full((2,), 3.5), pooled_projections=bb.pooled_projections.expand(2, -1),
              encoder_hidden_states=bb.prompt_embeds.expand(2, -1, -1), txt_ids=torch.zeros(bb.prompt_embeds.shape[1], 3),
              img_ids=image_ids(8, 8, torch.device("cpu"), torch.float32))  # fmt: skip
        ours = bb.forward_features(x_t, t, "all")
    for h in hooks:
        h.remove()
    assert sorted(ours) == sorted(caught) == [1, 2, 3, 4]
    assert [b.name for b in bb.blocks] == ["x_embedder", "transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    for n, tokens in caught.items():
        expected = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        assert torch.allclose(ours[n], expected, atol=1e-4 * expected.abs().max().item()), n
    with torch.no_grad():
        assert torch.equal(bb.forward_features(x_t, t, [3])[3], ours[3])


def test_flux_conditioning_is_the_pipelines_own_encode_prompt(flux_folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_folder)
    embeds, pooled, _ = pipe.encode_prompt("a red boat", None)
    bb = load_backbone(f"diffusers:{flux_folder}", prompt="a red boat", image_size=SIZE)
    for ours, theirs in ((bb.prompt_embeds, embeds), (bb.pooled_projections, pooled)):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs.detach(), atol=1e-4 * theirs.abs().max().item())
    assert bb.guidance == 3.5 and load_backbone(f"diffusers:{flux_folder}", guidance="2", image_size=SIZE).guidance == 2.0
    assert load_backbone(f"diffusers:{flux_folder}", guidance="2", image_size=SIZE).fingerprint() != bb.fingerprint()


def test_flux_through_the_cli_and_bad_options(flux_folder, cifar_small, tmp_path, capsys):
    spec = f"diffusers:{flux_folder}"
    assert main(["blocks", spec, "-o", f"image_size={SIZE}"]) == 0
    out = capsys.readouterr().out
    assert "(flow)" in out and "use_dynamic_shifting=True" in out and "single_transformer_blocks.1" in out
    assert "weights to here (bf16)" in out  # what each depth needs
    bb = load_backbone(spec, image_size=SIZE)
    bb.require_whole("counting")  # read every block and the head
    head = sum(p.numel() for name in ("norm_out", "proj_out") for p in getattr(bb.model, name).parameters())
    total = sum(p.numel() for p in bb.model.parameters())
    assert bb.weights_to(4) == total - head and bb.weights_to(2) < bb.weights_to(3) < bb.weights_to(4)
    block = sum(p.numel() for p in bb.model.single_transformer_blocks[1].parameters())
    assert bb.weights_to(4) - bb.weights_to(3) == block
    sweep = tmp_path / "sweep"
    assert main(["sweep", spec, "-o", f"image_size={SIZE}", "--data", str(cifar_small), "--blocks", "2,4", "--t", "200,700",
                 "--pool", "1", "--limit", "100", "--out", str(sweep)]) == 0  # fmt: skip
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["controls"]["random_weights"]["report"]["rows"] == summary["roles"]["report"] > 0
    assert main(["sample", spec, "-o", f"image_size={SIZE}", "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2"]) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    schnell = save_flux(tmp_path / "schnell", guidance=False)
    with pytest.raises(DiffprobeError, match="has no guidance embedding"):
        load_backbone(f"diffusers:{schnell}", guidance=3.5)
    assert load_backbone(f"diffusers:{schnell}", image_size=SIZE).guidance is None


def test_a_gated_hub_model_says_how_to_log_in():
    from diffprobe.backbones.pipeline_parts import offline_error

    class GatedRepoError(Exception):  # huggingface_hub's, by name (its constructor needs an HTTP response)
        pass

    error = offline_error("black-forest-labs/FLUX.1-dev", GatedRepoError("401 Client Error. Cannot access gated repo"))
    assert "gated model" in str(error) and "huggingface-cli login" in str(error) and "diffusers:DIR" in str(error)
    assert "\n" not in str(error)


def test_blocks_are_read_only_as_deep_as_a_pass_goes(flux_folder, tmp_path):
    """A pass to block N reads blocks 1..N from the shards and nothing deeper: the parameters held
    are those blocks 1..N need, and the features equal diffusers' own whole load's. up_to_block=N
    caps the depth: deeper blocks and sampling are one line. One fingerprint for every depth."""
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel.from_pretrained(flux_folder, subfolder="transformer").eval()
    total = sum(p.numel() for p in reference.parameters())
    lazy = load_backbone(f"diffusers:{flux_folder}", image_size=SIZE).eval()
    torch.manual_seed(1)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([400, 400])
    for deepest in (1, 2, 3, 4):  # the token embedding, the double-stream block, the single-stream blocks
        with torch.no_grad():
            ours = lazy.forward_features(x_t, t, [deepest])[deepest]
        held = sum(p.numel() for p in lazy.model.parameters())
        assert held == lazy.weights_to(deepest) < total, deepest
    reference_bb = lazy.random_like()  # the same backbone class around diffusers' own whole load
    reference_bb.model = reference
    with torch.no_grad():
        assert torch.equal(reference_bb.forward_features(x_t, t, [4])[4], ours)
    capped = load_backbone(f"diffusers:{flux_folder}", image_size=SIZE, up_to_block="3").eval()
    assert capped.fingerprint() == lazy.fingerprint()  # the same files: one identity, shared stores
    assert capped.block_table() == lazy.block_table()  # the table shows every depth
    with pytest.raises(DiffprobeError, match=r"block 4 is deeper than this backbone may read \(up_to_block=3\)"):
        capped.forward_features(x_t, t, [4])
    with pytest.raises(DiffprobeError, match="sampling needs the whole denoiser"):
        capped.denoise(x_t, t)
    with pytest.raises(DiffprobeError, match="up_to_block=9: this model has blocks 1..4"):
        load_backbone(f"diffusers:{flux_folder}", up_to_block=9)


def test_a_shard_that_does_not_fit_the_config_is_one_line(flux_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(flux_folder, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["single_transformer_blocks.1.proj_out.weight"] = tensors["single_transformer_blocks.1.proj_out.weight"][:, :-1].contiguous()
    del tensors["single_transformer_blocks.0.norm.linear.bias"]
    save_file(tensors, weights)
    bb = load_backbone(f"diffusers:{broken}", image_size=SIZE)  # the embeddings fit: loading succeeds
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with pytest.raises(DiffprobeError, match=r"does not fit its config: it lacks single_transformer_blocks\.0\.norm\.linear\.bias"):
        bb.forward_features(x_t, t, [3])
