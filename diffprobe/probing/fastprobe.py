"""Fast probes for searching settings: L-BFGS logistic regression (CLIP protocol) and cosine kNN.

Written on torch rather than taken from scikit-learn because the same code must run on a GPU
for ImageNet-size probes (1.28M × 4096 features), where scikit-learn's CPU float64 solver takes
hours; tests check it against `sklearn.linear_model.LogisticRegression` on the same features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffprobeError


@dataclass
class ProbeScore:
    method: str
    top1: float  # on the evaluation rows, in percent
    top5: float
    params: dict = field(default_factory=dict)  # e.g. the C chosen on validation
    curve: list = field(default_factory=list)  # (C, validation top-1) for each C tried


def _check(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray) -> None:
    if len(train) == 0 or len(val) == 0:
        raise DiffprobeError("a probe needs training and validation rows; the store or split is empty")
    if train.shape[1] != val.shape[1]:
        raise DiffprobeError(f"train and validation features differ in width ({train.shape[1]} vs {val.shape[1]})")
    if len(np.unique(y_train)) < 2:
        raise DiffprobeError("the training rows hold a single class: nothing to classify")


def topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return 100.0 * (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).float().mean().item()


class Standardizer:
    """Per-feature mean and scale of the training rows (features of U-Net blocks differ wildly in scale)."""

    def __init__(self, train: torch.Tensor):
        self.mean = train.mean(0, keepdim=True)
        self.std = train.std(0, keepdim=True).clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, init: torch.Tensor | None,
               max_iter: int) -> torch.Tensor:  # fmt: skip
    """Multinomial logistic regression, scikit-learn's objective scaled by 1/(C·N):
    mean cross-entropy + ||W||² / (2·C·N), bias unpenalised. Returns [D+1, K] (last row: bias)."""
    n, d = x.shape
    weights = (init.clone() if init is not None else torch.zeros(d + 1, num_classes, device=x.device, dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.LBFGS([weights], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-8)  # fmt: skip

    def closure():
        opt.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        loss = F.cross_entropy(logits, y) + (weights[:-1] ** 2).sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)
    return weights.detach()


def logistic_regression(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray,
                        Cs: list[float] | None = None, refine: int = 1, max_iter: int = 100,
                        device: str = "cpu") -> tuple[ProbeScore, dict]:  # fmt: skip
    """Sweep C (log grid, then `refine` rounds of halving the step around the best) and keep the
    best validation top-1. Returns the score and the fitted model {weights, mean, std, C}."""
    _check(train, y_train, val, y_val)
    dev = torch.device(device)
    dtype = torch.float32
    xtr = torch.as_tensor(train, dtype=dtype, device=dev)
    scale = Standardizer(xtr)
    xtr, xva = scale(xtr), scale(torch.as_tensor(val, dtype=dtype, device=dev))
    ytr, yva = torch.as_tensor(y_train, device=dev), torch.as_tensor(y_val, device=dev)
    num_classes = int(max(y_train.max(), y_val.max())) + 1

    tried: dict[float, tuple[float, torch.Tensor]] = {}
    warm: torch.Tensor | None = None

    def evaluate(log_c: float) -> float:
        nonlocal warm
        key = round(log_c, 6)
        if key not in tried:
            w = _fit_lbfgs(xtr, ytr, num_classes, 10.0**log_c, warm, max_iter)
            warm = w
            tried[key] = (topk(xva @ w[:-1] + w[-1], yva, 1), w)
        return tried[key][0]

    grid = [float(np.log10(c)) for c in (Cs or np.logspace(-3, 1, 5))]
    for log_c in sorted(grid):
        evaluate(log_c)
    step = (grid[1] - grid[0]) if len(grid) > 1 else 1.0
    for _ in range(3):  # a best C on the grid's edge: extend the grid that way (up to 3 steps)
        best = max(tried, key=lambda k: (tried[k][0], -abs(k)))
        if len(grid) < 2 or min(tried) < best < max(tried):
            break
        evaluate(best - step if best == min(tried) else best + step)
    for _ in range(refine if len(grid) > 1 else 0):
        step /= 2
        best = max(tried, key=lambda k: (tried[k][0], -abs(k)))
        for log_c in (best - step, best + step):
            evaluate(log_c)
    best = max(tried, key=lambda k: (tried[k][0], -abs(k)))
    w = tried[best][1]
    logits = xva @ w[:-1] + w[-1]
    score = ProbeScore("logreg", topk(logits, yva, 1), topk(logits, yva, 5), {"C": 10.0**best},
                       [(10.0**k, acc) for k, (acc, _) in sorted(tried.items())])  # fmt: skip
    model = {"weights": w.float().cpu(), "mean": scale.mean.float().cpu(), "std": scale.std.float().cpu(), "C": 10.0**best}
    return score, model


def knn(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, k: int = 20,
        temperature: float = 0.07, device: str = "cpu", chunk: int = 1024) -> ProbeScore:  # fmt: skip
    """Cosine kNN with similarity-weighted votes exp(s/T), as DINO evaluates features."""
    _check(train, y_train, val, y_val)
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    scores = knn_votes(train, y_train, val, num_classes, k, temperature, device, chunk)
    yva = torch.as_tensor(y_val, device=scores.device)
    return ProbeScore("knn", topk(scores, yva, 1), topk(scores, yva, 5), {"k": min(k, len(train)), "temperature": temperature})


def knn_votes(train: np.ndarray, y_train: np.ndarray, x: np.ndarray, num_classes: int, k: int = 20, temperature: float = 0.07,
              device: str = "cpu", chunk: int = 1024) -> torch.Tensor:  # fmt: skip
    """Each row of x's class votes [N, classes] from its k nearest training rows (cosine)."""
    dev = torch.device(device)
    xtr = F.normalize(torch.as_tensor(train, dtype=torch.float32, device=dev), dim=1)
    ytr = torch.as_tensor(y_train, device=dev)
    k = min(k, len(xtr))
    votes = []
    for start in range(0, len(x), chunk):
        q = F.normalize(torch.as_tensor(x[start:start + chunk], dtype=torch.float32, device=dev), dim=1)
        sims, idx = (q @ xtr.T).topk(k, dim=1)
        scores = torch.zeros(len(q), num_classes, device=dev)
        scores.scatter_add_(1, ytr[idx], (sims / temperature).exp())
        votes.append(scores)
    return torch.cat(votes)


def logreg_logits(model: dict, x: np.ndarray) -> torch.Tensor:
    """The logits of a fitted `logistic_regression` model on new rows."""
    w = model["weights"]
    z = (torch.as_tensor(x, dtype=torch.float32) - model["mean"]) / model["std"]
    return z @ w[:-1] + w[-1]
