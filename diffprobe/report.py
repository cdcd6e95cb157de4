"""Plots and tables people look at: sweep heatmaps, training curves, confusion matrices (PNG),
each written beside a machine-readable file by its caller."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def short_source(source: str) -> str:
    """A backbone source for plot titles: family and file name, without the directories."""
    family, sep, target = source.partition(":")
    return f"{family}:{Path(target).name}" if sep else Path(source).name


def short_tap(tap: "int | str", width: int = 40) -> str:
    """A block number, or a module path short enough for an axis: its first two and last parts
    (down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0 -> down_blocks.2…9.attn1.to_out.0)."""
    text = str(tap)
    if len(text) <= width:
        return text
    parts = text.split(".")
    head, tail = ".".join(parts[:2]), parts[-1]
    for part in reversed(parts[2:-1]):
        if len(head) + len(tail) + len(part) + 2 > width:
            break
        tail = f"{part}.{tail}"
    return f"{head}…{tail}"


def heatmap(path: str | Path, values: np.ndarray, row_labels: Sequence, col_labels: Sequence, title: str,
            xlabel: str = "timestep t", ylabel: str = "block", best: tuple[int, int] | None = None,
            colorbar: str = "top-1 %") -> None:  # fmt: skip
    """Annotated heatmap (rows × columns), NaN cells left blank, the best cell outlined."""
    fig_h = max(3.0, 0.32 * len(row_labels) + 1.5)
    label_width = 0.075 * max(len(str(r)) for r in row_labels)  # inches for the row labels (module paths are long)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(col_labels) + 2.5) + label_width, fig_h))
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap="viridis", aspect="auto")
    long_labels = max(len(str(c)) for c in col_labels) > 5
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=40 if long_labels else 0,
                  ha="right" if long_labels else "center")  # fmt: skip
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > mid else "white")  # fmt: skip
    if best is not None:
        ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(path: str | Path, history: Sequence[dict[str, float]], title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="selection rows")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_top1"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], label="selection rows")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 %")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def confusion_matrix_plot(path: str | Path, matrix: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix (rows: true class)."""
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve(path: str | Path, history: Sequence[dict[str, float]]) -> None:
    """Pre-training loss per logged step (log scale) with a moving average."""
    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="mean over 10 steps")
    if len(loss) >= 20:
        k = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"moving average ({k} points)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def head_bars(path: str | Path, rows: Sequence[dict], title: str) -> None:
    """Top-1 per (head, recipe) with its interval as an error bar, logistic regression as a dashed reference line."""
    reference = [r for r in rows if r["recipe"] == "-"]
    heads = [r for r in rows if r["recipe"] != "-"]
    kinds = list(dict.fromkeys(r["head"] for r in heads))
    recipes = list(dict.fromkeys(r["recipe"] for r in heads))
    width = 0.8 / max(1, len(recipes))
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2, 3.8))
    for j, recipe in enumerate(recipes):
        found = [next((r for r in heads if r["head"] == k and r["recipe"] == recipe), None) for k in kinds]
        values = [r["top1"] if r else np.nan for r in found]
        errors = np.array([[r["top1"] - r["low"], r["high"] - r["top1"]] if r and r.get("low") is not None else [0, 0]
                           for r in found]).T  # fmt: skip
        bars = ax.bar(np.arange(len(kinds)) + (j - (len(recipes) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                      label=f"{recipe} recipe")  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for r in reference:
        ax.axhline(r["top1"], ls="--", color="k", lw=1, label=f"{r['head']}: {r['top1']:.1f}")
    ax.set_xticks(np.arange(len(kinds)), kinds)
    _save_top1_bars(fig, ax, path, title)


def transfer_bars(path: str | Path, rows: Sequence[dict], title: str) -> None:
    """Top-1 per dataset with its interval as an error bar, the controls (where run) as markers."""
    names = [r["dataset"] for r in rows]
    x = np.arange(len(rows))
    values = [r["top1"] for r in rows]
    errors = np.array([[r["top1"] - r["low"], r["high"] - r["top1"]] if r.get("low") is not None else [0, 0] for r in rows]).T
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.8))
    bars = ax.bar(x, values, 0.6, yerr=errors, capsize=3, label="probe")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for key, marker, label in (("random_weights_top1", "v", "random weights"), ("pixels_top1", "x", "raw pixels")):
        if any(key in r for r in rows):
            ax.plot(x, [r.get(key, np.nan) for r in rows], marker, color="k", ls="none", label=label)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    _save_top1_bars(fig, ax, path, title)


def _save_top1_bars(fig, ax, path: str | Path, title: str) -> None:
    """The finish every top-1 bar chart shares: axis label, title, legend, PNG."""
    ax.set_ylabel("top-1 (%), 95% interval")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
