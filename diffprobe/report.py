"""Plots and tables people look at: sweep heatmaps, training curves, confusion matrices (PNG),
each written beside a machine-readable file by its caller."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


GENERIC_NAMES = {"ema.pt", "model.pt", "checkpoint.pt", "weights.pt", "model.safetensors", "pytorch_model.bin"}


def short_source(source: str) -> str:
    """A backbone source for plot titles: family and the last path part, with its folder where the
    file name alone says nothing (every pretrain run writes ema.pt): adm:diffprobe-cifar10/ema.pt."""
    family, sep, target = source.partition(":")
    path = Path(target if sep else source)
    name = f"{path.parent.name}/{path.name}" if path.name in GENERIC_NAMES and path.parent.name else path.name
    return f"{family}:{name}" if sep else name


def fitted_title(text: str, width_inches: float, fontsize: float = 12.0) -> str:
    """`text` wrapped to lines that fit `width_inches` at `fontsize` (a title wider than a narrow
    heatmap was cut off at both edges)."""
    chars = max(16, int(width_inches * 72 / (0.6 * fontsize)))  # ~0.6 em per character in DejaVu Sans
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


def _thinned_ticks(ax, axis: str, labels: Sequence[str], most: int = 60) -> None:
    """Tick labels for an axis, every k-th one when there are more than `most` (they overlapped)."""
    step = max(1, math.ceil(len(labels) / most))
    positions = range(0, len(labels), step)
    fontsize = 8 if len(labels) <= 20 else 6
    shown = [labels[i] for i in positions]
    if axis == "x":
        long_labels = max((len(t) for t in labels), default=0) > 5
        ax.set_xticks(list(positions), shown, rotation=40 if long_labels else 0, ha="right" if long_labels else "center",
                      fontsize=fontsize)  # fmt: skip
    else:
        ax.set_yticks(list(positions), shown, fontsize=fontsize)


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
            colorbar: str = "top-1 %", limits: tuple[float, float] | None = None, fmt: str = "{:.1f}",
            annotate_up_to: int = 20) -> None:  # fmt: skip
    """Annotated heatmap (rows × columns), NaN cells left blank, the best cell outlined.

    `limits` fixes the colour scale (CKA: 0-1) instead of the data's range. Past `annotate_up_to`
    rows or columns the cells are too small for numbers and go unannotated, cells shrink so the
    image stays within ~14 × 12 inches, and the axes label every k-th setting."""
    rows, cols = values.shape
    cell_w = 0.9 if cols <= annotate_up_to else min(0.9, 14.0 / cols)
    cell_h = 0.32 if rows <= 40 else min(0.32, 12.0 / rows)
    row_text = [str(r) for r in row_labels]
    label_width = 0.075 * max(len(r) for r in row_text)  # inches for the row labels (module paths are long)
    width = max(4.0, cell_w * cols + 2.5) + label_width
    fig, ax = plt.subplots(figsize=(width, max(3.0, cell_h * rows + 1.5)))
    masked = np.ma.masked_invalid(values)
    low, high = limits if limits is not None else (None, None)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    _thinned_ticks(ax, "x", [str(c) for c in col_labels])
    _thinned_ticks(ax, "y", row_text)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(fitted_title(title, width - label_width - 1.5, 11), fontsize=11)
    finite = values[np.isfinite(values)]
    mid = (low + high) / 2 if limits is not None else (finite.min() + finite.max()) / 2 if finite.size else 0
    if rows <= annotate_up_to * 2 and cols <= annotate_up_to:
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                            color="black" if values[i, j] > mid else "white")  # fmt: skip
    if best is not None:
        ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label=colorbar, fraction=min(0.15, 0.7 / width))  # ~0.7 in wide however wide the map
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(path: str | Path, history: Sequence[dict[str, float]], title: str, chosen_epoch: int | None = None) -> None:
    """Loss and top-1 per checked epoch, train against selection rows, the epoch the selection rows chose marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    marker = "o" if len(epochs) < 15 else None
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "top1", "top-1 %")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train", marker=marker)
        ax.plot(epochs, [h[f"select_{key}"] for h in history], label="selection rows", marker=marker)
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="red", ls=":", lw=1.2, label=f"chosen: epoch {chosen_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(fitted_title(title, 8.5, 12))
    _save(fig, path)


def confusion_matrix_plot(path: str | Path, matrix: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Row-normalised confusion matrix in percent (rows: true class), with the number of images it counts."""
    percent = 100 * matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(classes)
    width = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(width, max(3.8, 0.45 * n + 1.8)))
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if percent[i, j] > 50 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(fitted_title(f"{title} ({int(matrix.sum()):,} images)", width - 1.5, 10), fontsize=10)
    fig.colorbar(im, ax=ax, label="% of the true class")
    _save(fig, path)


def loss_curve(path: str | Path, history: Sequence[dict[str, float]]) -> None:
    """Pre-training loss per logged step (log scale) with a moving average; points marked while
    there are few (a run with one logged row drew an empty axis)."""
    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=0.6, alpha=0.4 if len(loss) >= 20 else 1.0, marker="o" if len(loss) < 20 else None,
            label="mean over the logging interval")  # fmt: skip
    if len(loss) >= 20:
        k = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"moving average ({k} points)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def head_bars(path: str | Path, rows: Sequence[dict], title: str) -> None:
    """Top-1 per (head, recipe) with its interval as an error bar, logistic regression as a dashed reference line."""
    reference = [r for r in rows if r["recipe"] == "-"]
    heads = [r for r in rows if r["recipe"] != "-"]
    kinds = list(dict.fromkeys(r["head"] for r in heads))
    recipes = list(dict.fromkeys(r["recipe"] for r in heads))
    width = 0.8 / max(1, len(recipes))
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 4.5, 3.8))
    for j, recipe in enumerate(recipes):
        found = [next((r for r in heads if r["head"] == k and r["recipe"] == recipe), None) for k in kinds]
        values = [r["top1"] if r else np.nan for r in found]
        errors = np.array([[r["top1"] - r["low"], r["high"] - r["top1"]] if r and r.get("low") is not None else [0, 0]
                           for r in found]).T  # fmt: skip
        bars = ax.bar(np.arange(len(kinds)) + (j - (len(recipes) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                      label=f"{recipe} recipe")  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=7, zorder=4, bbox=LABEL_BOX)
    for r in reference:
        ax.axhline(r["top1"], ls="--", color="k", lw=1, zorder=1, label=f"{r['head']}: {r['top1']:.1f}")
    ax.set_xticks(np.arange(len(kinds)), kinds)
    _save_top1_bars(fig, ax, path, title)


def transfer_bars(path: str | Path, rows: Sequence[dict], title: str) -> None:
    """Top-1 per dataset with its interval as an error bar, the controls (where run) as markers."""
    names = [r["dataset"] for r in rows]
    x = np.arange(len(rows))
    values = [r["top1"] for r in rows]
    errors = np.array([[r["top1"] - r["low"], r["high"] - r["top1"]] if r.get("low") is not None else [0, 0] for r in rows]).T
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 4.5, 3.8))
    bars = ax.bar(x, values, 0.6, yerr=errors, capsize=3, label="probe")
    ax.bar_label(bars, fmt="%.1f", fontsize=7, zorder=4, bbox=LABEL_BOX)
    for key, marker, label in (("random_weights_top1", "v", "random weights"), ("pixels_top1", "x", "raw pixels")):
        if any(key in r for r in rows):
            ax.plot(x, [r.get(key, np.nan) for r in rows], marker, color="k", ls="none", label=label)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    _save_top1_bars(fig, ax, path, title)


LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85}  # a reference line passes behind a value, not through it


def _save_top1_bars(fig, ax, path: str | Path, title: str) -> None:
    """The finish every top-1 bar chart shares: axis label, title, a legend beside the bars (inside, it hid them), PNG."""
    ax.set_ylabel("top-1 (%), 95% interval")
    ax.set_title(fitted_title(title, fig.get_size_inches()[0] - 1.0, 9), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)


def compare_bars(path: str | Path, rows: Sequence[dict], kinds: Sequence[str], names: Sequence[str], title: str) -> None:
    """Top-1 per backbone (groups) and probe (bars), each with its interval; non-generative backbones' labels in italics."""
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) * max(1, len(kinds)) / 2 + 4.5, 4.2))
    x = np.arange(len(rows))
    for j, (kind, name) in enumerate(zip(kinds, names)):
        figures = [r.get(kind) or {} for r in rows]
        values = [f.get("top1") if f.get("top1") is not None else np.nan for f in figures]
        errors = np.array([[f["top1"] - f["low"], f["high"] - f["top1"]] if f.get("low") is not None else [0, 0] for f in figures]).T
        bars = ax.bar(x + (j - (len(kinds) - 1) / 2) * width, values, width, yerr=errors, capsize=2, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, zorder=4, bbox=LABEL_BOX)
    labels = [textwrap.fill(r["backbone"], 22) for r in rows]
    ax.set_xticks(x, labels, fontsize=7)
    for tick, r in zip(ax.get_xticklabels(), rows):
        tick.set_fontstyle("normal" if r["generative"] == "yes" else "italic")
    ax.set_xlabel("backbone (italic: not generative)")
    _save_top1_bars(fig, ax, path, title)
