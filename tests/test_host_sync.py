"""No pass makes the host wait for the GPU, checked on the meta device (tests/host_sync.py),
since a GPU is not always there to run sync debug mode."""

from __future__ import annotations

import pytest

from diffprobe import load_backbone
from diffprobe.features.plan import FeaturePlan
from host_sync import Audit, audit_featurize
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


def test_the_audit_sees_host_reads_and_host_data_copied_up():
    import torch

    x = torch.zeros(3, device="meta")
    with Audit() as audit:
        x + torch.ones(3).to("meta")  # a host-made tensor copied up
        x.sum().item()  # a host read (answered with 0: meta has no value to give)
        torch.tensor([1.0, 2.0], device=x.device)  # host data made into a device tensor
        x[torch.tensor([0, 2])]  # indexed by a host tensor
        x[torch.zeros(2, dtype=torch.long, device="meta")] + torch.full((2,), 1.0, device="meta")  # none of these
    assert [e.split(" (")[0].split(" at ")[0] for e in audit.events] == [
        "host tensor copied up", "host read", "host data copied up", "indexed by a host tensor"], audit.events
    assert all("test_host_sync.py" in e for e in audit.events)  # each names the line that asked for it
