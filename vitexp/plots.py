"""PNG figures for a run folder: learning curves and confusion matrices. Names in them may come from files (a
model's, a class folder's): they are drawn as plain text, never read as mathtext, and the PNG goes through the one
writer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from vitexp import files  # noqa: E402
from vitexp.files import plot_text  # noqa: E402


def learning_curves(rows: list[dict[str, float]], path: Path, title: str, *, root: Path) -> None:
    """Loss, accuracy and learning rate against epoch, from metrics.csv rows; `root`: the run folder `path` is in."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))

    def curve(ax, key: str, label: str) -> None:
        points = [(e, r[key]) for e, r in zip(epochs, rows) if key in r]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)

    curve(axes[0], "train/loss", "train")
    curve(axes[0], "val/loss", "val")
    axes[0].set(title="loss", xlabel="epoch")
    curve(axes[1], "val/acc1", "val top-1")
    curve(axes[1], "val/acc5", "val top-5")
    curve(axes[1], "val_ema/acc1", "val top-1 (EMA)")
    axes[1].set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    curve(axes[2], "lr", "lr")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(plot_text(title))
    fig.tight_layout()
    _save(fig, path, root)


def confusion_matrix(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str, *, root: Path) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted); `root`: the run folder."""
    norm = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    image = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        names = [plot_text(c, limit=40) for c in classes]
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true", title=plot_text(title))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, path, root)


def accuracy_vs_macs(points: Sequence[tuple[str, dict]], path: Path, title: str, *, root: Path) -> None:
    """Val accuracy against MACs per image, one labelled point per stage (unpruned, each round, fine-tuned);
    `root`: the run folder."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    macs = [p["macs"] / 1e6 for _, p in points]
    accs = [p["val_acc1"] for _, p in points]
    ax.plot(macs, accs, marker="o")
    for i, ((label, _), x, y) in enumerate(zip(points, macs, accs)):
        # alternate above/below so that a round and its fine-tuned point (same MACs) stay readable
        ax.annotate(
            plot_text(label, limit=40), (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 else -12), fontsize=8
        )
    ax.set(xlabel="MMACs per image", ylabel="val top-1", title=plot_text(title))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, root)


def _save(fig: plt.Figure, path: Path, root: Path) -> None:
    try:
        files.save_figure(fig, path, root)
    finally:
        plt.close(fig)
