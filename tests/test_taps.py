"""Any activation by name (issue 22): module paths inside blocks as taps, checked against diffusers'
own forward caught with hooks, with early exit counted module by module, and through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT  # noqa: F401  (tests/ on the path: latent_models)
from diffprobe import DiffprobeError, load_backbone
from diffprobe.cli import main
from diffprobe.features.store import FeatureKey
from latent_models import save_flux, save_sd

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # self-attention output, tokens
FF = "mid_block.attentions.0.transformer_blocks.0.ff"  # feed-forward output, tokens
RESNET = "up_blocks.0.resnets.1"  # a resnet inside an up block, a map
CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # cross-attention output, tokens


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("taps-sd") / "pipe")


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4 * theirs.abs().max().item())


def test_inner_modules_equal_diffusers_own_forward(sd_folder):
    """Attention, feed-forward and resnet outputs inside blocks, tapped by path, equal the same
    modules' outputs caught with hooks on UNet2DConditionModel's own forward (tokens as maps)."""
    from diffusers import UNet2DConditionModel

    bb = load_backbone(f"diffusers:{sd_folder}").eval()
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").eval()
    caught = {}
    for path in (ATTN, FF, RESNET, CROSS):
        unet.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: caught.__setitem__(path, caught.get(path, o)))
    torch.manual_seed(0)
    x_t, t = torch.randn(2, *bb.model_shape), torch.tensor([300, 300])
    with torch.no_grad():
        unet(x_t, t, encoder_hidden_states=bb.context.expand(2, -1, -1))
        ours = bb.forward_features(x_t, t, [ATTN, FF, RESNET, CROSS, 3])
    assert sorted(map(str, ours)) == sorted(map(str, [ATTN, FF, RESNET, CROSS, 3]))
    for path in (ATTN, FF, CROSS):
        tokens = caught[path]
        side = int(tokens.shape[1] ** 0.5)
        _close(ours[path], tokens.transpose(1, 2).reshape(2, -1, side, side))
    _close(ours[RESNET], caught[RESNET])
    with torch.no_grad():
        assert torch.equal(bb.forward_features(x_t, t, [3])[3], ours[3])  # block numbers keep working beside paths
    info = bb.tap_info(FF)
    assert (info.channels, info.resolution) == (ours[FF].shape[1], ours[FF].shape[-1])


def test_the_pass_stops_at_the_last_tapped_module(sd_folder):
    """Early exit at an inner module: no module starts after it has given its output; with a
    block number deeper than the tap, the pass runs to that block and the tap is unchanged."""
    bb = load_backbone(f"diffusers:{sd_folder}").eval()
    started: list[str] = []
    for name, module in bb.model.named_modules():
        if name:
            module.register_forward_pre_hook(lambda m, i, name=name: started.append(name))
    finished: list[str] = []
    bb.model.get_submodule(ATTN).register_forward_hook(lambda m, i, o: finished.append(len(started)))
    x_t, t = torch.randn(1, *bb.model_shape), torch.tensor([500])
    with torch.no_grad():
        early = bb.forward_features(x_t, t, [ATTN])[ATTN]
    assert finished == [len(started)]  # the tap was the last module to run: nothing started after it
    assert not any(name.startswith(("down_blocks.1", "mid_block", "up_blocks")) for name in started)
    started.clear()
    with torch.no_grad():
        both = bb.forward_features(x_t, t, [ATTN, bb.num_blocks])
    assert torch.equal(both[ATTN], early) and any(name.startswith("up_blocks") for name in started)


def test_bad_module_paths_are_one_line(sd_folder):
    bb = load_backbone(f"diffusers:{sd_folder}")
    with pytest.raises(DiffprobeError, match=r"no module 'down_blocks.0.attentions.0.transformer_blocks.0.atn1'.*nearest: .*attn1"):
        bb.resolve_blocks(["down_blocks.0.attentions.0.transformer_blocks.0.atn1"])
    with pytest.raises(DiffprobeError, match="gives .*not a map .* or image tokens"):
        bb.resolve_blocks([CROSS + ".to_k"])  # keys of the prompt: text tokens
    with pytest.raises(DiffprobeError, match=r"runs \d times in one pass"):
        bb.resolve_blocks(["down_blocks.0.resnets.0.nonlinearity"])  # one SiLU shared by a resnet
    with pytest.raises(DiffprobeError, match="does not run in a feature pass"):
        bb.resolve_blocks(["conv_out"])
    with pytest.raises(DiffprobeError, match="neither a block number nor a module path"):
        bb.resolve_blocks(["up blocks"])


def test_block_numbers_and_paths_agree_across_families(sd_folder, tmp_path):
    """A block's own module, tapped by path, gives the block's features: ADM (paper numbering),
    FLUX (the image stream of a joint block's output); and the meta-pass table finds every block."""
    adm = load_backbone("adm:random", image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                        num_head_channels=16, channel_mult="1,2").eval()  # fmt: skip
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 100])
    with torch.no_grad():
        by_number = adm.forward_features(x, t, [3, 4])
        by_path = adm.forward_features(x, t, ["input_blocks.2", "input_blocks.3.1"])  # block 3; block 4's attention
    assert torch.equal(by_number[3], by_path["input_blocks.2"])
    assert by_path["input_blocks.3.1"].shape == by_number[4].shape  # [B, C, N] attention output as a map
    assert adm.tap_block("input_blocks.3.1.qkv") == 4
    flux = load_backbone(f"diffusers:{save_flux(tmp_path / 'flux')}", image_size="16").eval()
    x = torch.randn(2, *flux.model_shape)
    with torch.no_grad():
        out = flux.forward_features(x, t, [2, "transformer_blocks.0", "transformer_blocks.0.attn"])
    assert torch.equal(out[2], out["transformer_blocks.0"]) and out["transformer_blocks.0.attn"].shape == out[2].shape
    with pytest.raises(DiffprobeError, match="not a map"):
        flux.resolve_blocks(["context_embedder"])  # the prompt's tokens
    with pytest.raises(DiffprobeError, match="mixes text and image streams"):
        flux.resolve_blocks(["transformer_blocks.0.attn+probs"])  # joint attention


def test_sweep_extract_and_probe_take_module_paths(sd_folder, cifar_small, tmp_path, capsys):
    spec = f"diffusers:{sd_folder}"
    assert main(["blocks", spec, "--all"]) == 0
    listing = capsys.readouterr().out
    assert ATTN in listing and f"{CROSS}.to_k " not in listing and "give a map" in listing
    sweep = tmp_path / "sweep"
    assert main(["sweep", spec, "--data", str(cifar_small), "--blocks", f"3,{ATTN},{FF}", "--t", "100,500", "--pool", "1",
                 "--limit", "100", "--no-controls", "--out", str(sweep)]) == 0  # fmt: skip
    rows = (sweep / "sweep.csv").read_text()
    assert ATTN in rows and FF in rows
    assert (sweep / "heatmap_pool1.png").is_file()
    stems = sorted(p.name for p in (sweep / "features" / "features").glob("*.npy"))
    assert f"t0100_p1_m{ATTN}.npy" in stems and "t0100_b03_p1.npy" in stems
    assert FeatureKey.parse(f"t0100_p1_m{ATTN}") == FeatureKey(100, ATTN, 1)
    run = tmp_path / "probe"
    assert main(["probe", str(sweep / "features"), "--t", "100", "--blocks", FF, "--out", str(run), "--epochs", "3"]) == 0
    assert json.loads((run / "metrics.json").read_text())["report"]["top1"] >= 0


def test_attention_probabilities_by_path(sd_folder):
    """PATH+probs: a self- or cross-attention module's probabilities, averaged over heads, equal those
    diffusers' own AttnProcessor computes (get_attention_scores), as maps [B, keys, h, w]."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    bb = load_backbone(f"diffusers:{sd_folder}").eval()
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").eval()
    unet.set_attn_processor(AttnProcessor())
    caught = {}
    for path in (ATTN, CROSS):
        module = unet.get_submodule(path)
        scores = module.get_attention_scores
        module.get_attention_scores = lambda q, k, m=None, path=path, scores=scores, module=module: caught.setdefault(path, scores(q, k, m))
    x_t, t = torch.randn(2, *bb.model_shape), torch.tensor([300, 300])
    with torch.no_grad():
        unet(x_t, t, encoder_hidden_states=bb.context.expand(2, -1, -1))
        ours = bb.forward_features(x_t, t, [ATTN + "+probs", CROSS + "+probs"])
    for path in (ATTN, CROSS):
        heads = unet.get_submodule(path).heads
        per_head = caught[path]  # [B·heads, queries, keys]
        probs = per_head.view(2, heads, *per_head.shape[1:]).mean(1)
        side = int(probs.shape[1] ** 0.5)
        _close(ours[path + "+probs"], probs.transpose(1, 2).reshape(2, -1, side, side))
    assert ours[CROSS + "+probs"].shape[1] == bb.context.shape[1]  # one channel per prompt token
    assert torch.allclose(ours[CROSS + "+probs"].sum(1), torch.ones(2, 8, 8))  # each query's weights sum to 1
    with pytest.raises(DiffprobeError, match="not an attention module"):
        bb.resolve_blocks([FF + "+probs"])
