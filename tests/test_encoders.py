"""Image encoders as backbones (timm, torchvision, transformers): block features equal each
library's own intermediate outputs on tiny models built with its constructors; no timestep; each
model's preprocessing; bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe.backbones import load_backbone
from diffprobe.cli import main


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name, options", [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}),
    ("resnet18", {}),
])  # fmt: skip
def test_timm_blocks_equal_timms_forward_intermediates(tmp_path, name, options):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **options).eval()
    weights = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(weights))
    bb = load_backbone(f"timm:{name}", weights=str(weights), **options)  # a local file, as timm loads it
    assert bb.weights_note == f"file {weights}" and not bb.random_weights
    layers = len(reference.feature_info)
    x = bb.encode(_images(bb.image_size))
    with torch.no_grad():
        ours = bb.forward_features(x, 0, list(range(1, layers + 1)))
        theirs = reference.forward_intermediates(x, indices=list(range(layers)), stop_early=True, intermediates_only=True)
    for i, expected in enumerate(theirs, start=1):
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=0)
    if getattr(reference, "num_prefix_tokens", 0):  # the class token after the final norm is one more block
        assert bb.blocks[-1].name == "cls" and bb.blocks[-1].resolution == 1
        with torch.no_grad():
            cls = bb.forward_features(x, 0, [layers + 1])[layers + 1][:, :, 0, 0]
            torch.testing.assert_close(cls, reference.forward_features(x)[:, 0])
    data = timm.data.resolve_model_data_config(reference)  # timm's own preprocessing: crop_pct, interpolation, mean/std
    assert bb.interpolation == data["interpolation"] and bb.config["preprocess"]["mean"] == list(data["mean"])
    assert bb.resize_size == int(bb.image_size / data["crop_pct"])


def _save_hf(tmp_path, kind: str):
    """A tiny random transformers vision model and its image processor in a folder, as save_pretrained writes them."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**small))
        processor = tf.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    elif kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**small))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "vit_mae":
        model = tf.ViTMAEModel(tf.ViTMAEConfig(**small))
        processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**small))
        processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    folder = tmp_path / kind
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.eval(), folder


@pytest.mark.parametrize("kind", ["dinov2", "clip", "vit_mae", "siglip"])
def test_transformers_blocks_equal_its_hidden_states(tmp_path, kind):
    reference, folder = _save_hf(tmp_path, kind)
    bb = load_backbone(f"hf:{folder}")
    prefix = 0 if kind == "siglip" else 1
    x = bb.encode(_images(bb.image_size))
    layers = reference.config.num_hidden_layers
    with torch.no_grad():
        ours = bb.forward_features(x, 0, list(range(1, layers + 1)))
        call = {"pixel_values": x, "output_hidden_states": True}
        if kind == "vit_mae":  # what diffprobe asks of ViT-MAE: no patch masked, none shuffled
            reference.config.mask_ratio = 0.0
            call["noise"] = torch.arange(16, dtype=torch.float32).expand(len(x), 16)
        hidden = reference(**call).hidden_states
    for i in range(1, layers + 1):
        tokens = ours[i].flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, hidden[i][:, prefix:], rtol=0, atol=1e-6 if kind == "vit_mae" else 0)
    assert (bb.blocks[-1].name == "cls") == bool(prefix)
    if kind == "dinov2":  # the processor's resize, crop and statistics, not diffusion's [-1, 1]
        assert (bb.image_size, bb.resize_size) == (32, 36) and bb.config["preprocess"]["std"] == [0.229, 0.224, 0.225]
        with torch.no_grad():
            cls = bb.forward_features(x, 0, [layers + 1])[layers + 1][:, :, 0, 0]
        torch.testing.assert_close(cls, reference(pixel_values=x).last_hidden_state[:, 0])


def test_torchvision_stages_and_the_random_weights_control(tmp_path):
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(1)  # (the control's own seed is 0)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    bb = load_backbone("torchvision:resnet18", weights=str(tmp_path / "r18.pt"))
    assert [b.name for b in bb.blocks] == ["layer1", "layer2", "layer3", "layer4"]
    assert (bb.image_size, bb.resize_size) == (224, 256)
    x = bb.encode(_images(224, 1))
    with torch.no_grad():
        ours = bb.forward_features(x, 0, [2, 4])
        theirs = create_feature_extractor(reference, {"layer2": "layer2", "layer4": "layer4"})(x)
    torch.testing.assert_close(ours[2], theirs["layer2"])
    torch.testing.assert_close(ours[4], theirs["layer4"])
    random = bb.random_like(seed=0)
    assert random.random_weights and random.fingerprint() != bb.fingerprint()
    assert [b.name for b in random.blocks] == [b.name for b in bb.blocks]


def test_encoder_stores_and_bad_input(tmp_path, cifar_small, capsys, caplog):
    spec = "timm:vit_tiny_patch16_224"
    small = ["-o", "weights=random", "-o", "img_size=32", "-o", "patch_size=8", "-o", "depth=2"]
    store = tmp_path / "store"
    assert main(["extract", spec, *small, "--data", str(cifar_small), "--blocks", "all", "--pool", "1,2", "--limit", "60",
                 "--out", str(store)]) == 0  # fmt: skip
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["noise"]["schedule"] == "clean-image" and {p.name[:5] for p in (store / "features").glob("*.npy")} == {"t0000"}
    assert "RANDOM weights" in caplog.text
    assert main(["probe", str(store), "--blocks", "3", "--epochs", "2", "--out", str(tmp_path / "run")]) == 0  # --t: the store's one
    image = next((cifar_small / "cat").iterdir())  # predict reloads the random-weights model: the same weights, from the seed
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]

    bad = [
        (["extract", spec, *small, "--data", str(cifar_small), "--blocks", "1", "--t", "90", "--out", str(tmp_path / "s")],
         "not a diffusion model"),
        (["blocks", "timm:no_such_model_xyz"], "timm does not know the model 'no_such_model_xyz'"),
        (["blocks", "torchvision:no_such_arch"], "torchvision does not know the model 'no_such_arch'"),
        (["blocks", "hf:someone/not-downloaded-model"], "cannot load transformers model 'someone/not-downloaded-model'"),
        (["blocks", "timm:vit_tiny_patch16_224"], "offline? timm downloads its weights"),
        (["extract", spec, *small, "--data", str(cifar_small), "--blocks", "up_blocks.1", "--out", str(tmp_path / "s")],
         "take block numbers"),
    ]  # fmt: skip
    for argv, expected in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and "Traceback" not in "\n".join(err), (argv, err)
    with pytest.raises(DiffprobeError, match="not a generative model"):
        load_backbone(spec, weights="random", img_size=32, patch_size=8, depth=2).denoise(torch.zeros(1, 3, 32, 32), torch.zeros(1))
