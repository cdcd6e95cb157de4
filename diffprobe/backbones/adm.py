"""The ADM (guided-diffusion) U-Net, written to load the released checkpoints unchanged.

Module and parameter names follow the released state_dicts key for key
(`input_blocks.3.0.in_layers.0.weight`, ...), so a checkpoint loads with a plain
`load_state_dict`. The forward pass is split in two so that feature extraction can stop
after the deepest block it needs: `embed` makes the timestep (and class) embedding, and
`run_blocks` walks the paper's block numbering and returns the blocks asked for.

Architecture facts are in ../shared/docs/PAPER.md ("ADM architecture facts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffprobeError


@dataclass(frozen=True)
class ADMArchitecture:
    """What the network's shape needs, resolved from guided-diffusion's flags."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]  # downsampling factors (image_size // resolution) with attention
    channel_mult: tuple[float, ...]
    dropout: float
    num_classes: int | None
    num_heads: int
    num_heads_upsample: int
    num_head_channels: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics, as guided-diffusion's (fp16-safe).

    guided-diffusion upcasts the input to float32. For bf16/fp16 inputs PyTorch's GroupNorm
    kernels already accumulate in float32, so we hand them the input as it is (with autocast
    off, which would upcast it): same statistics, without two full-tensor copies per norm
    (measured ~15× faster for the norm on CPU, see benchmarks/extract.py).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x.float()).type(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if x.device.type == "cpu" and x.ndim == 4 and x.shape[2] * x.shape[3] <= 256 and _is_channels_last(x):
                # The CPU channels_last GroupNorm kernel is slow on small maps with many channels
                # (5.0 ms vs 1.4 ms with the copies, 32×128×16×16 bf16): normalise a contiguous copy.
                y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
                return y.contiguous(memory_format=torch.channels_last)
            if x.device.type == "cpu":  # the CPU kernel takes float32 affine parameters as they are
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: cos half first, then sin (ADM's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Upsample(nn.Module):
    """Nearest ×2, then (optionally) a 3×3 conv. Key name `conv` as in the checkpoints."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3×3 conv, or 2×2 average pooling. Key name `op` as in the checkpoints."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Without autograd, elementwise steps run in place: fewer full-size temporaries (measured
        # in benchmarks/extract.py). With autograd the same maths runs out of place.
        inplace = not torch.is_grad_enabled()
        norm_in, _, conv_in = self.in_layers
        h = F.silu(norm_in(x), inplace=inplace)
        if self.updown:  # resample after the first GN+SiLU, on both paths (resblock_updown)
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv_in(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        norm_out, _, dropout, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)  # GN(h)·(1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        h = conv_out(dropout(F.silu(h, inplace=inplace)))
        skip = self.skip_connection(x)
        return h.add_(skip) if inplace else skip + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions; `legacy` selects the released models' qkv layout."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise DiffprobeError(
                    f"attention with {channels} channels cannot be split into heads of {num_head_channels} channels"
                )
            self.num_heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = _norm(channels)
        # 1×1 Conv1d, as in the checkpoints (weights of shape [out, in, 1]).
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        x_flat = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(x_flat))
        length, heads = height * width, self.num_heads
        ch = c // heads
        # SDPA wants [b, heads, length, ch] with unit stride along ch; a contiguous copy makes
        # its CPU kernels several times faster than strided views of the conv output.
        if self.new_order:  # all q, then all k, then all v; each split into heads
            qkv = qkv.reshape(b, 3, heads, ch, length).permute(1, 0, 2, 4, 3).contiguous()
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:  # legacy: per head, its q, k, v in turn
            qkv = qkv.reshape(b, heads, 3 * ch, length).transpose(-1, -2).contiguous()
            q, k, v = qkv.split(ch, dim=-1)
        # q·k scaled by ch^-1/2 (guided-diffusion scales each of q and k by ch^-1/4): SDPA's default.
        a = F.scaled_dot_product_attention(q, k, v)
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, length))
        return (x_flat + h).reshape(b, c, height, width)


class EmbedSequential(nn.Sequential):
    """A block: a sequence whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's `UNetModel` (2-D), with checkpoint-compatible parameter names."""

    def __init__(self, arch: ADMArchitecture):
        super().__init__()
        self.arch = arch
        mc = arch.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if arch.num_classes is not None:
            self.label_emb = nn.Embedding(arch.num_classes, emb_dim)

        def res(cin: int, cout: int, **updown: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, arch.dropout, cout, arch.use_scale_shift_norm, **updown)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, arch.num_head_channels, arch.use_new_attention_order)

        ch = input_ch = int(arch.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(arch.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        levels = len(arch.channel_mult)
        for level, mult in enumerate(arch.channel_mult):
            for _ in range(arch.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in arch.attention_ds:
                    layers.append(attn(ch, arch.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if arch.resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, arch.num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(arch.channel_mult))):
            for i in range(arch.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in arch.attention_ds:
                    layers.append(attn(ch, arch.num_heads_upsample))
                if level and i == arch.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if arch.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, arch.out_channels, 3, padding=1))

    @property
    def num_blocks(self) -> int:
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.arch.model_channels))
        if self.arch.num_classes is not None:
            if y is None:
                raise DiffprobeError("this ADM model is class-conditional: pass class labels y")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise DiffprobeError("this ADM model is unconditional: do not pass class labels y")
        return emb

    def run_blocks(self, x: torch.Tensor, emb: torch.Tensor, wanted: tuple[int, ...],
                   inject: dict[int, torch.Tensor] | None = None, out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
        """Outputs of the blocks in `wanted` (paper numbers), in one pass stopping at the deepest.

        inject: tensors added to encoder blocks' outputs (before the skip connection takes them),
        DifFeed's feedback. A plain loop returning a dict (not a generator), so torch.compile can
        trace it whole. out: the dict to fill (a pass a hook ends early keeps what it has).
        """
        last = max(wanted)
        out = {} if out is None else out
        skips: list[torch.Tensor] = []
        h = x
        number = 0
        for module in self.input_blocks:
            h = module(h, emb)
            number += 1
            if inject is not None and number in inject:
                h = h + inject[number]
            skips.append(h)
            if number in wanted:
                out[number] = h
            if number >= last:
                return out
        h = self.middle_block(h, emb)
        number += 1
        if number in wanted:
            out[number] = h
        for module in self.output_blocks:
            if number >= last:
                return out
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            number += 1
            if number in wanted:
                out[number] = h
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The full denoiser: ε prediction (and variance channels with learned sigma)."""
        h = self.run_blocks(x, self.embed(t, y), (self.num_blocks,))[self.num_blocks]
        return self.out(h)
