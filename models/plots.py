"""Plots a person would rather look at than read: training curves, LR finder."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def training_curves(histories: dict[int, pd.DataFrame], path: Path, title: str = "") -> Path:
    """Train loss and validation weighted log loss per epoch, one line per fold."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fold, h in sorted(histories.items()):
        axes[0].plot(h["epoch"], h["train_loss"], marker="o", label=f"fold {fold}")
        axes[1].plot(h["epoch"], h["val_wlogloss"], marker="o", label=f"fold {fold}")
        if "val_prior" in h:
            axes[1].axhline(h["val_prior"].iloc[0], ls=":", lw=1, color=axes[1].lines[-1].get_color())
    axes[0].set(title="train loss (weighted BCE)", xlabel="epoch")
    axes[1].set(title="validation weighted log loss (dotted: prior)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lr_finder(lrs, losses, suggestion: float, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", ls="--", label=f"suggested lr {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title=title or "learning-rate finder")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
