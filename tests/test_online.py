"""Online features: heads trained on features the frozen backbone computes per batch (full maps, DifFeed)."""

from __future__ import annotations

import json

import torch

from conftest import FIXTURE_SPEC
from diffprobe import load_backbone
from diffprobe.cli import main


def test_online_attention_head_on_full_maps_leaves_the_backbone_unchanged(cifar_small, tmp_path, capsys):
    from diffprobe.data import open_dataset
    from diffprobe.features.plan import FeaturePlan
    from diffprobe.probing.config import ProbeConfig
    from diffprobe.probing.online import OnlineOptions, train_online

    bb = load_backbone(FIXTURE_SPEC)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    res = bb.blocks[2].resolution  # block 3's full map
    fitted = train_online(bb, open_dataset(cifar_small), FeaturePlan(t=10, blocks=3, pools=res),
                          ProbeConfig("attention", options={"width": 32, "heads": 4, "depth": 1}, epochs=2),
                          tmp_path / "run", OnlineOptions(limit=60, progress=False))  # fmt: skip
    assert len(fitted.metrics["history"]) == 2 and fitted.metrics["select"]["rows"] > 0 and fitted.metrics["report"]["rows"] > 0
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert all(p.grad is None for p in bb.parameters())
    # The run serves `predict` like any other (online features = what featurize computes).
    image = sorted((cifar_small / "cat").iterdir())[0]
    assert main(["predict", str(tmp_path / "run"), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]


def test_online_diffeed_through_the_cli(cifar_small, tmp_path, capsys):
    bb = load_backbone(FIXTURE_SPEC)
    bottom = bb.bottleneck_block
    feedback = [b for b in range(bottom + 1, bb.num_blocks + 1) if bb.blocks[b - 1].resolution == bb.blocks[bb.num_blocks - b].resolution]
    read = feedback[len(feedback) // 2]
    code = main(["probe-online", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "40", "--t", "10", "--blocks", str(read),
                 "--pool", "2", "--head", "diffeed", "--feedback-blocks", ",".join(map(str, feedback)), "--epochs", "1",
                 "--width", "32", "--heads", "4", "--depth", "1", "--out", str(tmp_path / "fb")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "diffeed head (online features): top-1" in capsys.readouterr().out
    assert (tmp_path / "fb" / "feedback.pt").is_file()
    assert main(["predict", str(tmp_path / "fb"), str(sorted((cifar_small / "cat").iterdir())[0])]) == 2
    assert "DifFeed run" in capsys.readouterr().err
