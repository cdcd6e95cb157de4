"""Sampling with diffusers schedulers and FID with a supplied Inception weights file."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch

from diffprobe.backbones import load_backbone
from diffprobe.errors import DiffprobeError
from diffprobe.generate.fid import compute_fid, inception_fid, load_npz_images
from diffprobe.generate.sample import make_scheduler, sample_images, save_samples

TINY = dict(image_size=16, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
            num_head_channels=32, diffusion_steps=50)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return load_backbone("adm:random", **TINY)


def test_schedulers_use_the_models_schedule(tiny_backbone):
    for sampler in ("ddpm", "ddim"):
        scheduler = make_scheduler(tiny_backbone, sampler, learned_sigma=False)
        np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), tiny_backbone.schedule.alphas_cumprod, rtol=1e-5)


def test_ddim_is_deterministic_and_saves_grid_and_npz(tiny_backbone, tmp_path):
    a = sample_images(tiny_backbone, 5, "ddim", steps=4, seed=1, batch_size=3)
    b = sample_images(tiny_backbone, 5, "ddim", steps=4, seed=1, batch_size=3)
    c = sample_images(tiny_backbone, 5, "ddim", steps=4, seed=2, batch_size=3)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    files = save_samples(a, tmp_path, {"seed": 1})
    assert torch.equal(load_npz_images(files["npz"]), a)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_ddpm_runs_every_step_and_refuses_fewer(tiny_backbone):
    images = sample_images(tiny_backbone, 2, "ddpm", steps=50, seed=0)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(DiffprobeError, match="ddpm samples with all 50 steps"):
        sample_images(tiny_backbone, 2, "ddpm", steps=10)


def _random_inception_file(tmp_path, monkeypatch):
    """The TF-FID Inception network's layout with random weights, saved as a weights file.

    Stands in for the real file (not downloadable here): the loading path is the same one.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for name, param in net.named_parameters():  # left uninitialised by the class: give it a spread
        if param.ndim > 1:
            torch.nn.init.kaiming_normal_(param)
    for name, buf in net.named_buffers():
        if name.endswith("running_var"):
            buf.fill_(1.0)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_with_a_weights_file(tmp_path, monkeypatch):
    weights = _random_inception_file(tmp_path, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen)
    other = (real.float() * 0.3).to(torch.uint8)
    same = compute_fid(inception_fid(weights), real, [real], 8, batch_size=8)
    differ = compute_fid(inception_fid(weights), other, [real], 8, batch_size=8)
    assert abs(same) < 1e-3 * max(differ, 1.0) and differ > 0


def test_fid_without_weights_offline_says_so(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(DiffprobeError, match="could not be downloaded.*--inception-weights FILE"):
        inception_fid(None)
    with pytest.raises(DiffprobeError, match="Inception weights not found"):
        inception_fid("/nonexistent/inception.pth")
