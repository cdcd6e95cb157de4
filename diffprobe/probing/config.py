"""How a head is trained, as one value: the head and its options, the recipe, the seeds.

A `ProbeConfig` is what `Probe(...)` keeps, what `diffprobe probe` builds from its flags, and
what a saved run's config.json records (`to_dict` / `from_dict`); the same config on the same
store gives the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import DiffprobeError
from ..features.roles import REPORT_SHARE
from ..validate import finite_float, positive_int
from .heads import head_options


MAX_FLOOR_EPOCHS = 500
MAX_LR = 10.0


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str  # sgd | adamw
    lr: float
    epochs: int
    batch_size: int = 128
    schedule: str = "step"  # step (×gamma every step_every epochs) | cosine (after linear warmup)
    step_every: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9
    min_steps: int = 0  # small datasets train for more epochs until this many optimiser steps
    label_smoothing: float = 0.0

    def for_rows(self, rows: int) -> "Recipe":
        """This recipe for a training set of `rows`: epochs raised towards `min_steps`, at most to
        MAX_FLOOR_EPOCHS (a store of a few hundred rows would otherwise loop for thousands)."""
        steps_per_epoch = max(1, -(-rows // self.batch_size))
        floor = min(-(-self.min_steps // steps_per_epoch), MAX_FLOOR_EPOCHS)
        return replace(self, epochs=max(self.epochs, floor))


# The modern recipe's searches, per head: every (lr, weight decay) pair is trained and the best
# on validation kept. Chosen by measurement on CIFAR-10 features of the shipped checkpoint
# (README "Heads"): a linear head on 128 ill-conditioned pool-1 features needs many steps and a
# high rate to reach the L-BFGS optimum; on 2,048 pool-4 features it needs AdamW decay 0.1-1
# (L-BFGS chose C = 0.03 on 18,000 images, 0.003 on 3,600), where 1e-4 overfits by 2-3 points;
# the MLP there gained 1.7 points from decay 0.5 over 0.05.
MODERN_SEARCH: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "linear": ((1e-2, 1e-1), (1e-4, 0.1, 1.0)),
    "mlp": ((1e-3,), (0.05, 0.5)),
    "cnn": ((1e-3,), (0.05,)),
    "attention": ((5e-4,), (0.05,)),
    "fusion": ((5e-4,), (0.05,)),
    "diffeed": ((5e-4,), (0.05,)),
}
PAPER_WEIGHT_DECAYS = (1e-4,)


def recipe_for(name: str, head: str, epochs: int | None = None, lr: float | None = None) -> Recipe:
    """`paper`: the public code's SGD recipe (lr 1e-2 linear, 5e-2 attention; ×0.1 every 7 epochs;
    28 epochs; batch 128). `modern`: AdamW, linear warmup then cosine, 30 epochs; the linear head
    trains for at least 15,000 steps (on a 5,000-image store 30 epochs stop far from the
    L-BFGS optimum), the others with label smoothing 0.1. `lr` None: the first of the head's searched rates."""
    if name == "paper":
        base = Recipe("paper", "sgd", 5e-2 if head in ("attention", "fusion") else 1e-2, 28)
    elif name == "modern":
        linear = head == "linear"
        base = Recipe("modern", "adamw", search_grid("modern", head)[0][0], 30, schedule="cosine", warmup_epochs=2,
                      min_steps=15_000 if linear else 0, label_smoothing=0.0 if linear else 0.1)  # fmt: skip
    else:
        raise DiffprobeError(f"unknown recipe {name!r}: expected paper or modern")
    changes = {k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None}
    if epochs is not None:
        changes["min_steps"] = 0  # epochs asked for are trained as asked
    return Recipe(**{**asdict(base), **changes})


def search_grid(name: str, head: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (learning rates, weight decays) a recipe tries for a head."""
    if name == "modern":
        return MODERN_SEARCH.get(head, MODERN_SEARCH["attention"])
    return (recipe_for(name, head).lr,), PAPER_WEIGHT_DECAYS


@dataclass(frozen=True)
class ProbeConfig:
    head: str = "linear"  # linear | mlp | cnn | attention | fusion
    recipe: str = "modern"  # modern (AdamW, cosine) | paper (the public code's SGD)
    options: dict[str, Any] = field(default_factory=dict)  # the head's own options (heads.HEAD_OPTIONS)
    weight_decays: tuple[float, ...] | None = None  # each is tried, the best on validation kept; None: the recipe's grid
    epochs: int | None = None  # None: the recipe's
    lr: float | None = None  # one rate; None: the recipe's grid of rates
    val_fraction: float = 0.1  # stratified held-out share of the dataset (the dataset-wide split)
    split_seed: int = 0
    seed: int = 0  # initialisation and shuffling
    report_share: float = REPORT_SHARE  # of the held-out rows, the share that reports (features/roles.py); the rest selects

    def __post_init__(self) -> None:
        if not isinstance(self.options, dict):
            raise DiffprobeError(f"options: expected a dict of head options, got {self.options!r}")
        object.__setattr__(self, "options", head_options(self.head, **self.options))
        wds = (self.weight_decays,) if isinstance(self.weight_decays, (int, float)) else self.weight_decays
        if wds is None:
            wds = search_grid(self.recipe, self.head)[1]  # an unknown recipe fails here, in recipe_for
        if isinstance(wds, (str, bytes)):
            raise DiffprobeError(f"weight_decays: expected numbers, got {wds!r}")
        object.__setattr__(self, "weight_decays", tuple(finite_float(w, "weight decay (--wd)", minimum=0) for w in wds))
        if not self.weight_decays:
            raise DiffprobeError("give at least one weight decay")
        if self.epochs is not None:
            object.__setattr__(self, "epochs", positive_int(self.epochs, "epochs (--epochs)"))
        if self.lr is not None:
            # Above MAX_LR no recipe here trains (AdamW's steps are ~lr in size; SGD's paper rate is 5e-2):
            # such a rate is a typo, and training on it only diverges.
            object.__setattr__(self, "lr", finite_float(self.lr, "learning rate (--lr)", above=0, maximum=MAX_LR))
        object.__setattr__(self, "val_fraction", finite_float(self.val_fraction, "val_fraction (--val-fraction)", above=0, below=1))
        object.__setattr__(self, "report_share", finite_float(self.report_share, "report share (--report-share)", minimum=0, below=1))
        for name in ("split_seed", "seed"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name, minimum=0))
        self.training_recipe()  # an unknown recipe fails here, not after extraction

    def training_recipe(self) -> Recipe:
        return recipe_for(self.recipe, self.head, self.epochs, self.lr)

    def training_recipes(self) -> list[Recipe]:
        """One recipe per learning rate tried: `lr` alone if given, else the recipe's grid."""
        lrs = (self.lr,) if self.lr is not None else search_grid(self.recipe, self.head)[0]
        return [recipe_for(self.recipe, self.head, self.epochs, lr) for lr in lrs]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_decays"] = list(self.weight_decays)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeConfig":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})
