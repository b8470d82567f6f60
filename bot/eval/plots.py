"""Report figures (PNG). Each function writes only the file it is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BAR_SERIES = ("adapter", "base zero-shot", "tfidf baseline")


def _save(fig: Figure, path) -> Path:
    # Figure + Agg canvas directly: no pyplot global state, safe inside a web server.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], title: str, path) -> Path:
    """Confusion-matrix heat map: colour = row-normalised rate, text = raw count.

    Args:
        confusion: square counts, rows = true, cols = pred.
        labels: names for rows/cols.
        title: figure title.
        path: PNG file to write.
    """
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    # Normalise per true class so small classes are as visible as large ones.
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(labels)
    side = max(3.5, 0.6 * k + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if rate[i, j] > 0.5 else "black", fontsize=9)
    return _save(fig, path)


def plot_learning_curve(points: dict[str, Sequence[tuple[int, float]]], title: str, path) -> Path:
    """Held-out accuracy against number of training examples (log x), one line per series.

    Args:
        points: series name -> [(n_train, accuracy), ...].
        title: figure title.
        path: PNG file to write.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, pts in points.items():
        pts = sorted((int(n), float(a)) for n, a in pts)
        if pts:
            ax.plot([n for n, _ in pts], [a for _, a in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training examples")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend()
    return _save(fig, path)


def plot_bar_summary(rows: Sequence[dict], path, title: str = "Held-out accuracy per task") -> Path:
    """Grouped bars: accuracy per task for adapter, base zero-shot and TF-IDF baseline.

    Args:
        rows: [{"task": str, "adapter": float, "base zero-shot": float,
            "tfidf baseline": float}, ...]; missing or None values draw no bar.
        path: PNG file to write.
        title: figure title.
    """
    tasks = [str(r["task"]) for r in rows]
    x = np.arange(len(tasks))
    width = 0.8 / len(BAR_SERIES)
    fig = Figure(figsize=(max(4, 1.6 * len(tasks) + 2), 4))
    ax = fig.add_subplot()
    for i, series in enumerate(BAR_SERIES):
        vals = [r.get(series) for r in rows]
        vals = [np.nan if v is None else float(v) for v in vals]
        ax.bar(x + (i - 1) * width, vals, width, label=series)
    ax.set_xticks(x, labels=tasks)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(BAR_SERIES), frameon=False)
    return _save(fig, path)
