"""What to extract, as one value: timesteps × blocks × pools, and the noise that makes it reproducible.

A `FeaturePlan` travels unchanged from the edge (CLI flags, a notebook) to the store and back
into saved runs: it is checked once against a backbone (`resolve`), and it serialises itself
once (`to_dict` / `from_dict`) for manifests and run configs alike.

    plan = FeaturePlan(t=90, blocks=24, pools=2)            # ints or sequences; blocks may be "all"
    plan = plan.resolve(backbone)                            # sorted, unique, range-checked
    plan.keys                                                # [FeatureKey(90, 24, 2)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import numbers
import re
from typing import TYPE_CHECKING, Any, Iterable, Union

from ..errors import DiffprobeError
from ..validate import positive_int
from .store import FeatureKey, feature_keys

if TYPE_CHECKING:
    from ..backbones.base import Backbone

IntsLike = Union[int, str, Iterable[int]]
TapsLike = Union[int, str, Iterable[Union[int, str]]]
MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*(\+probs)?$")  # +probs: an attention module's probabilities


def parse_taps(value: TapsLike) -> tuple[int | str, ...]:
    """Block numbers and module paths: 19, "19,up_blocks.1.attentions.0", [19, "mid_block"] ->
    (19, "mid_block"); numbers sorted first, then paths by name (a path's place in the pass is
    the backbone's to know)."""
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        parts = [p.strip() if isinstance(p, str) else p for p in value]
    else:
        parts = [value]
    numbers_, paths = [], set()
    for part in parts:
        if isinstance(part, str) and not part.lstrip("-").isdigit():
            if not MODULE_PATH.match(part):
                raise DiffprobeError(f"blocks: {part!r} is neither a block number nor a module path "
                                     "(e.g. 19 or up_blocks.1.attentions.0.transformer_blocks.0.attn1)")  # fmt: skip
            paths.add(part)
        else:
            numbers_.append(part)
    return parse_ints(numbers_, "blocks") + tuple(sorted(paths))


def parse_ints(value: IntsLike, what: str) -> tuple[int, ...]:
    """7, "7,9", [7, 9] -> (7, 9); sorted and unique. 10.7 or None is an error, never rounded."""
    example = f"expected integers (e.g. {what}=90 or [90, 150])"
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        parts = list(value)
    else:
        raise DiffprobeError(f"{what}: {example}, got {value!r}")
    out = set()
    for p in parts:
        if isinstance(p, str):
            try:
                p = int(p)
            except ValueError:
                raise DiffprobeError(f"{what}: {example}, got {value!r}") from None
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not float(p).is_integer():
            raise DiffprobeError(f"{what}: {example}, got {value!r}")
        out.add(int(p))
    return tuple(sorted(out))


@dataclass(frozen=True)
class FeaturePlan:
    """Timesteps × blocks × pool sizes, plus the noise: ε is a function of (noise_seed, image, draw)."""

    t: tuple[int, ...]
    blocks: tuple[int | str, ...] | str  # block numbers and module paths; "all" until resolved against a backbone
    pools: tuple[int, ...] = (1,)
    noise_seed: int = 0
    draws: int = 1  # noise draws averaged per image
    resolved: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", () if self.t is None else parse_ints(self.t, "t"))  # (): set by resolve (encoders: 0)
        blocks = self.blocks
        if isinstance(blocks, str) and blocks.strip().lower() == "all":
            object.__setattr__(self, "blocks", "all")
        else:
            object.__setattr__(self, "blocks", parse_taps(blocks))
        object.__setattr__(self, "pools", parse_ints(self.pools, "pools"))
        if not self.blocks:
            raise DiffprobeError("no blocks requested")
        if not self.pools or min(self.pools) < 1:
            raise DiffprobeError(f"pool sizes must be integers ≥ 1, got {list(self.pools)}")
        object.__setattr__(self, "noise_seed", positive_int(self.noise_seed, "noise_seed", minimum=0))
        object.__setattr__(self, "draws", positive_int(self.draws, "draws (noise samples averaged per image)"))

    def resolve(self, backbone: "Backbone") -> "FeaturePlan":
        """The plan checked against this backbone: timesteps in its schedule, blocks in range
        ('all' expanded), pools no larger than each block's map. The one place these are checked."""
        if self.resolved:
            return self
        if not backbone.schedule.noisy and not self.t:
            return replace(self, t=(0,)).resolve(backbone)  # an image encoder: the clean image, t = 0
        if not self.t:
            raise DiffprobeError("no timesteps requested: a diffusion model needs --t (e.g. --t 90,150)")
        backbone.schedule.check_timesteps(self.t)
        blocks = tuple(backbone.resolve_blocks(self.blocks))
        for b in blocks:
            res = backbone.tap_info(b).resolution
            if max(self.pools) > res > 1:  # (a 1×1 block is a vector, such as an encoder's class token: every pool repeats it)
                where = f"block {b}'s" if isinstance(b, int) else f"{b}'s"
                raise DiffprobeError(f"pool {max(self.pools)} is larger than {where} {res}×{res} feature map")
        return replace(self, blocks=blocks, resolved=True)

    @property
    def keys(self) -> list[FeatureKey]:
        if self.blocks == "all" or not self.t:
            raise DiffprobeError("resolve the plan against a backbone first: blocks='all' or no timesteps has no keys yet")
        return feature_keys(self.t, self.blocks, self.pools)

    @classmethod
    def from_keys(cls, keys: Iterable[FeatureKey], noise_seed: int = 0, draws: int = 1) -> "FeaturePlan":
        """The smallest plan covering these (t, block, pool) settings."""
        keys = list(keys)
        return cls(t=[k.t for k in keys], blocks=[k.block for k in keys], pools=[k.pool for k in keys],
                   noise_seed=noise_seed, draws=draws)  # fmt: skip

    def noise(self) -> dict[str, int]:
        return {"seed": self.noise_seed, "draws": self.draws}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("resolved")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeaturePlan":
        return cls(t=d["t"], blocks=d["blocks"], pools=d.get("pools", (1,)), noise_seed=d.get("noise_seed", 0),
                   draws=d.get("draws", 1))  # fmt: skip
