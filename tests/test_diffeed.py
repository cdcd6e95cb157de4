"""DifFeed against a hand-checked case: shapes, injection arithmetic, and that feedback changes the encoder."""

from __future__ import annotations

import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe.probing.diffeed import DifFeed, mirror


def test_injection_adds_to_the_encoder_block_before_its_skip(fixture_backbone):
    bb = fixture_backbone
    x = torch.randn(2, *bb.model_shape)
    t = torch.full((2,), 10)
    plain = bb.forward_features(x, t, [3, bb.num_blocks])
    delta = torch.randn_like(plain[3])
    fed = bb.forward_features(x, t, [3, bb.num_blocks], inject={3: delta})
    assert torch.allclose(fed[3], plain[3] + delta)  # the block's output carries the feedback
    assert not torch.allclose(fed[bb.num_blocks], plain[bb.num_blocks])  # and the decoder sees it through the skip
    # By hand: the ADM walk with block 3's output shifted, continued to the end.
    m, emb = bb.model, bb.model.embed(t)
    h, skips = x, []
    for i, module in enumerate(m.input_blocks, start=1):
        h = module(h, emb) + (delta if i == 3 else 0)
        skips.append(h)
    h = m.middle_block(h, emb)
    for module in m.output_blocks:
        h = module(torch.cat([h, skips.pop()], dim=1), emb)
    assert torch.allclose(h, fed[bb.num_blocks], atol=1e-5)


def test_diffeed_shapes_and_feedback(fixture_backbone):
    bb = fixture_backbone
    n = bb.num_blocks
    decoder = [b for b in range(bb.bottleneck_block + 1, n + 1) if bb.blocks[b - 1].resolution == bb.blocks[mirror(bb, b) - 1].resolution]
    read = decoder[len(decoder) // 2]
    head = torch.nn.Linear(bb.blocks[read - 1].channels * 4, 10)
    model = DifFeed(bb, decoder, read, pool=2, head=head)
    assert set(model.adapters) == {str(b) for b in decoder}
    x, t = torch.randn(3, *bb.model_shape), 10
    logits = model(x, t)
    assert logits.shape == (3, 10)
    # The adapters' outputs are what the encoder receives; they are not zero, so the read block moves.
    fed = model.read(x, t)
    plain = bb.forward_features(x, t, [read])[read]
    assert fed.shape == plain.shape and not torch.allclose(fed, plain)
    # With the adapters silenced (ReLU(BN(0)) = 0 when the conv is zero and BN's shift is 0), DifFeed is the plain pass.
    for adapter in model.adapters.values():
        torch.nn.init.zeros_(adapter[0].weight), torch.nn.init.zeros_(adapter[0].bias)
    assert torch.allclose(model.read(x, t), plain, atol=1e-6)
    # Only adapters and head learn; the backbone gets no gradient.
    model.train()
    model(x, t).sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"adapters", "head"}


def test_diffeed_refuses_encoder_blocks(fixture_backbone):
    with pytest.raises(DiffprobeError, match="feeds decoder blocks back"):
        DifFeed(fixture_backbone, [2], 3, 1, torch.nn.Identity())
