"""No pass makes the host wait for the GPU, checked on the meta device (tests/host_sync.py),
since a GPU is not always there to run sync debug mode."""

from __future__ import annotations

import pytest

from diffprobe import load_backbone
from diffprobe.features.plan import FeaturePlan
from host_sync import HostSyncAudit, audit_featurize
from latent_models import save_sd


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("host-sync") / "sd")


# Every family's walk is audited by benchmarks/gpu_check.py's parity section, which
# tests/test_benchmarks.py runs with --device cpu --tiny.


def test_a_module_path_tap_leaves_the_host_free(sd_folder):
    bb = load_backbone(f"diffusers:{sd_folder}")
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # tokens, read as a map by a hook
    assert audit_featurize(bb, FeaturePlan(t=100, blocks=[attention, 2], pools=[1])) == []


def test_the_audit_sees_a_host_read_and_a_host_tensor_copied_up():
    import torch

    x = torch.zeros(3, device="meta")
    with HostSyncAudit() as audit:
        x + torch.ones(3).to("meta")  # a host-made tensor copied up
        try:
            x.sum().item()  # a host read (meta has no value to give)
        except Exception:
            pass
    assert len(audit.events) == 2, audit.events
    assert "copied up" in audit.events[0] and "host read" in audit.events[1]
