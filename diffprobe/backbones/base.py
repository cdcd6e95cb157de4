"""The contract every backbone keeps, whatever its model family.

    backbone.blocks                                -> [BlockInfo(index, name, channels, resolution)]
    backbone.encode(images)                        -> model space (latents for VAE models; pixels otherwise)
    backbone.forward_features(x_t, t, [19, 24])    -> {19: Tensor, 24: Tensor}
    backbone.denoise(x_t, t)                       -> the network's output (ε, + variance channels)
    backbone.decode(x0)                            -> images in [-1, 1] (for sampling)
    backbone.forward_intermediates(x_t, t, [19])   -> timm's name for forward_features

All requested blocks come out of one forward pass that stops after the deepest one.
Nothing downstream knows which family it is reading: encoding, conditioning and the denoiser
are methods here, so no caller touches `backbone.model` or tests `backbone.family`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import DiffprobeError
from ..features.noise import NoiseSchedule, is_one_timestep


@dataclass(frozen=True)
class BlockInfo:
    index: int  # 1-based, the paper's numbering for ADM
    name: str  # module path inside the model, e.g. "output_blocks.4"
    channels: int
    resolution: int  # side of the square feature map at the backbone's image_size


class Backbone(nn.Module):
    """A frozen diffusion U-Net seen as a feature extractor."""

    family: str = "?"
    generative: bool = True  # a diffusion model; image encoders (encoders.py) are not
    random_weights: bool = False  # encoders built with weights=random say so (tables, logs)
    resize_size: int | None = None  # short side the data transform resizes to before the centre crop (None: image_size)
    interpolation: str = "bilinear"  # the data transform's resize filter

    def __init__(self, model: nn.Module, blocks: list[BlockInfo], image_size: int, schedule: NoiseSchedule,
                 num_classes: int | None, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.blocks = blocks
        self.image_size = image_size
        self.schedule = schedule
        self.num_classes = num_classes  # None: unconditional
        self.config = config  # everything that defines the architecture, JSON-serialisable
        self.source = source  # where the weights came from, for messages
        self._fingerprint: str | None = None
        self._run = None  # a compiled `run`, once `compile()` was called
        self.spec, self.load_options = source, {}  # set by load_backbone

    def __repr__(self) -> str:  # nn.Module's would print every layer of the network
        return (f"{type(self).__name__}({self.spec!r}, {self.family}, {self.image_size}px, {self.num_blocks} blocks, "
                f"{self.schedule.name} ({self.schedule.parameterization}), {self.conditioning})")  # fmt: skip

    # -- implemented by each family -------------------------------------------------------
    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Outputs of the `wanted` blocks (valid, sorted) in one pass that stops at the deepest."""
        raise NotImplementedError

    def random_like(self, seed: int = 0) -> "Backbone":
        """The same architecture with freshly initialised weights: the random-weight control."""
        raise NotImplementedError

    def compile(self, **options: Any) -> None:
        """Run `run` through torch.compile from now on (fuses norms and pointwise ops on GPUs)."""
        self._run = torch.compile(self.run, dynamic=False, **options)

    # -- model space: overridden by latent families -------------------------------------------
    in_channels: int = 3  # channels of the space the noise is added in
    encodes_images: bool = False  # True: encode() is a network whose output is worth caching per image
    # The class label used when a class-conditional model is given none (DiT: the null class);
    # None: a class-conditional model needs one.
    default_class_label: int | None = None
    prediction_type: str = "epsilon"  # what denoise() predicts: "epsilon" or "v_prediction" (SD 2.x 768)

    def encoder_identity(self) -> str | None:
        """Hash of what encode() computes (VAE weights, scaling, image size); None when encode is the identity."""
        return None

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """Shape of one noised input (C, H, W): pixels here, latents for VAE models."""
        return (self.in_channels, self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Clean images in [-1, 1], [B, 3, S, S] -> the space the noise is added in (pixels: themselves)."""
        return images

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (pixels: themselves)."""
        return x0

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The full network's output for sampling: ε prediction (and variance channels if learned)."""
        raise NotImplementedError

    @property
    def conditioning(self) -> str:
        """What the network is conditioned on, in words (for tables and messages)."""
        return "class-conditional" if self.num_classes else "unconditional"

    @property
    def learned_sigma(self) -> bool:
        """Whether denoise() also returns variance channels (improved DDPM's learned range)."""
        return False

    @property
    def bottleneck_block(self) -> int | None:
        """Number of the block at the bottom of the U (the middle block); None for non-U-Nets."""
        names = [b.name for b in self.blocks]
        for candidate in ("middle_block", "mid_block"):
            if candidate in names:
                return names.index(candidate) + 1
        return None

    # -- shared -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style description of every block: num_chs, reduction (input side / map side), module, index."""
        return [{"num_chs": b.channels, "reduction": self.image_size // b.resolution, "module": b.name, "index": b.index}
                for b in self.blocks]  # fmt: skip

    def resolve_blocks(self, blocks: Iterable[int | str] | str) -> list[int | str]:
        """Block numbers (sorted, unique; 'all' means every block), then module paths inside the
        denoiser in the order the pass runs them (backbones/taps.py). Out of range, or a module that
        is not there, does not run, or gives no map, is one line."""
        from ..features.plan import parse_taps

        if isinstance(blocks, str) and blocks.strip().lower() == "all":
            blocks = range(1, self.num_blocks + 1)
        chosen = list(parse_taps(blocks))
        if not chosen:
            raise DiffprobeError("no blocks requested")
        numbers = [b for b in chosen if isinstance(b, int)]
        bad = [b for b in numbers if not 1 <= b <= self.num_blocks]
        if bad:
            raise DiffprobeError(
                f"block {bad[0]} is out of range: this {self.family} model has blocks 1..{self.num_blocks} "
                f"(see `diffprobe blocks {self.source}`)"
            )
        paths = sorted(self.tap_infos([p for p in chosen if isinstance(p, str)]), key=lambda info: info.order)
        deepest = max(numbers + [info.block for info in paths])
        if self.loaded_to is not None and deepest > self.loaded_to:
            raise DiffprobeError(f"block {deepest} is deeper than this backbone may read (up_to_block={self.loaded_to}): "
                                 f"load it with up_to_block={deepest} or more, or without it")  # fmt: skip
        return numbers + [info.path for info in paths]

    # -- taps: any module by path (backbones/taps.py) ---------------------------------------------
    def tap_table(self) -> dict[str, Any]:
        """Every module a feature pass runs, in order, with its output and block (a meta-device pass, once)."""
        table = self.__dict__.get("_tap_table")
        if table is None:
            from .taps import build_table

            table = self.__dict__["_tap_table"] = build_table(self)
        return table

    def tap_info(self, tap: int | str) -> BlockInfo:
        """What a block number or a module path gives: name, channels, resolution (index: its place in the pass)."""
        if isinstance(tap, int):
            return self.blocks[tap - 1]
        from .taps import check_path

        info = check_path(self, tap, self.tap_table())
        return BlockInfo(info.order, tap, info.channels, info.resolution)

    def tap_block(self, path: str) -> int:
        """The block number whose computation runs module `path`."""
        return self.tap_infos([path])[0].block

    def tap_infos(self, paths: list[str]) -> list[Any]:
        """taps.TapInfo of each module path (checked); block numbers alone never build the module table."""
        if not paths:
            return []
        from .taps import check_path

        table = self.tap_table()
        return [check_path(self, p, table) for p in paths]

    supports_feedback: bool = False  # run() takes `inject` (tensors added to encoder block outputs)

    def forward_features(self, x_t: torch.Tensor, t: int | torch.Tensor, blocks: Iterable[int | str] | str,
                         y: torch.Tensor | None = None, inject: dict[int, torch.Tensor] | None = None
                         ) -> dict[int | str, torch.Tensor]:  # fmt: skip
        """Outputs of `blocks` (block numbers, module paths) for the noisy batch x_t at timestep(s) t, in
        one pass that stops after the last of them. inject: {encoder block: tensor added to its
        output} (DifFeed's second pass)."""
        wanted = self.resolve_blocks(blocks)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.model_shape:
            raise DiffprobeError(f"expected a noised batch [B, {', '.join(map(str, self.model_shape))}], got shape {list(x_t.shape)}")
        t_tensor = self._timesteps(t, x_t)
        numbers = [b for b in wanted if isinstance(b, int)]
        infos = self.tap_infos([b for b in wanted if isinstance(b, str)])  # the module paths, checked once a pass
        deepest = max(numbers + [info.block for info in infos])
        if self.lazy is not None:  # blocks not read yet come off the disk now, outside any compiled code
            self.lazy.read_to(self.model, deepest)
        if inject:
            if not self.supports_feedback:
                raise DiffprobeError(f"feeding features back (DifFeed) is implemented for ADM U-Nets; {self.family} backbones do not support it")
            if infos:
                raise DiffprobeError("DifFeed reads block numbers, not module paths")
            return self.run(x_t, t_tensor, y, tuple(wanted), inject)
        if not infos:
            return (self._run or self.run)(x_t, t_tensor, y, tuple(wanted))
        return self._run_with_taps(x_t, t_tensor, y, numbers, infos, deepest)

    def _timesteps(self, t: int | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """t as one value per image on x_t's device, checked against the schedule on the host.

        A Python t is checked as given and filled on the device; reading a device tensor back
        (`.tolist()`) or copying a host one up without pinning would make the host wait for the
        GPU at every pass. A tensor t is checked on a host copy (free when it lives on the CPU).
        """
        if not is_one_timestep(t):  # a tensor (or a list) of timesteps
            values = torch.as_tensor(t).detach().reshape(-1)
            self.schedule.check_timesteps(sorted(set(values.cpu().tolist())))
            values = values.to(x_t.device)
            return values.expand(x_t.shape[0]) if values.numel() == 1 else values
        self.schedule.check_timesteps([t])
        return torch.full((x_t.shape[0],), t, device=x_t.device)

    def _run_with_taps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, numbers: list[int],
                       infos: list[Any], deepest: int) -> dict[int | str, torch.Tensor]:  # fmt: skip
        """One eager pass with hooks on the tapped modules (hooks and compiled code do not mix). It
        ends at the last tap when no block number asked for lies deeper, so nothing after it runs."""
        from .taps import StopPass, TapHooks

        stop = max(info.block for info in infos) > max(numbers, default=0)
        out: dict[int | str, torch.Tensor] = {}
        with TapHooks(self.model, infos, stop) as hooks:
            try:
                self.run(x, t, y, tuple(sorted(set(numbers) | {deepest})), out=out)
            except StopPass:
                pass
        result: dict[int | str, torch.Tensor] = {b: out[b] for b in numbers}
        result.update((info.path, hooks.maps[info.path]) for info in infos)
        return result

    def forward_intermediates(self, x_t: torch.Tensor, t: int | torch.Tensor, indices: Iterable[int] | str,
                              stop_early: bool = True, y: torch.Tensor | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
        """timm's name for forward_features: block outputs, stopping after the deepest (always early here)."""
        return self.forward_features(x_t, t, indices, y=y)

    def fingerprint(self) -> str:
        """Hash of the architecture config and every weight: two stores agree only if this does."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(repr(sorted(self.config.items())).encode())
            h.update(self.schedule.identity())
            if self.weight_files:  # one fingerprint for a partial and a whole load of the same files
                from .partial import weights_hash

                h.update(weights_hash(self.weight_files).encode())
            else:
                hash_tensors(h, self.model.state_dict())
            hash_tensors(h, self.extra_identity())
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint

    def extra_identity(self) -> dict[str, torch.Tensor]:
        """Tensors outside `self.model` that change the features (a VAE, an encoded prompt)."""
        return {}

    # Stacked-transformer families name the modules that run only after their last block (the
    # output head); their blocks then run in order, so what a block needs is known exactly.
    tail_modules: tuple[str, ...] = ()
    lazy: Any = None  # backbones/partial.LazyDepth: reads blocks from safetensors as passes first need them
    loaded_to: int | None = None  # up_to_block: no block deeper than this is ever read (backbones/partial.py)
    weight_files: list | None = None  # the safetensors the denoiser is read from: the fingerprint hashes them as stored
    depth_weights: dict[int, int] | None = None  # weights_to of every block, from the full config (blocks may be unread)

    def require_whole(self, what: str) -> None:
        """Read every block and the output head that are not read yet; refused under up_to_block."""
        if self.loaded_to is not None:
            raise DiffprobeError(f"{what} needs the whole denoiser, and this one may read only up to block {self.loaded_to} "
                                 "(up_to_block): load it without up_to_block")  # fmt: skip
        if self.lazy is not None:
            self.lazy.read_all(self.model)

    def weights_to(self, block: int) -> int | None:
        """Parameters the denoiser needs to compute up to `block` (an upper bound for block 1,
        which counts the timestep and text embedders), or None where blocks do not run in a chain."""
        if self.depth_weights is not None:
            return self.depth_weights.get(block)
        if not self.tail_modules:
            return None
        return weights_to(self.model, self.blocks, self.tail_modules, block)

    def block_table(self) -> list[dict[str, Any]]:
        rows = [asdict(b) for b in self.blocks]
        for row in rows:
            needed = self.weights_to(row["index"])
            if needed is not None:
                row["weights_to_here"] = needed
        return rows


def weights_to(model: nn.Module, blocks: list[BlockInfo], tail: Iterable[str], block: int) -> int:
    """Parameters of `model` outside the blocks after `block` and the tail modules (works on the meta device)."""
    modules = dict(model.named_modules())
    later = [b.name for b in blocks if b.index > block] + list(tail)
    skipped = sum(p.numel() for name in later if name in modules for p in modules[name].parameters())
    return sum(p.numel() for p in model.parameters()) - skipped


def hash_tensors(h: "hashlib._Hash", tensors: dict[str, torch.Tensor]) -> None:
    """Feed names, shapes, dtypes and raw bytes of the tensors, in name order, into the hash h."""
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # (reshape: 0-d counters too)
