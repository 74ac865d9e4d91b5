"""Stage two's plots: feature importance (LightGBM) and the sequence member's validation curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def importance_plot(names, gain, path: Path, top: int = 30) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = np.argsort(gain)[::-1][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(order) + 1.2))
    ax.barh([names[i] for i in order], gain[order] / max(gain.sum(), 1e-12))
    ax.set(xlabel="share of total gain (all labels and folds)", title="stage two: top features")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_plot(curves: np.ndarray, path: Path, train: np.ndarray | None = None) -> Path:
    """The sequence members' validation curves (one per fold) and their mean: where training stopped;
    with `train`, each member's training loss per epoch (dashed, same colour): how far apart they are."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = np.arange(1, curves.shape[1] + 1)
    for i, c in enumerate(curves):
        line, = ax.plot(epochs, c, lw=1, alpha=0.6, label=f"member {i} on its fold")
        if train is not None:
            ax.plot(epochs, train[i], lw=1, alpha=0.6, ls="--", color=line.get_color(),
                    label="training loss (dashed)" if i == 0 else None)
    ax.plot(epochs, curves.mean(axis=0), color="black", lw=2, label="mean")
    ax.set(xlabel="epoch", ylabel="weighted log loss", title="stage two: sequence member")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
