"""The report's figures: matplotlib (Agg), one function per figure, each saved as a PNG.

Every function takes plain arrays / tables and a path, draws in one shared
style (white background, light grid, no top/right spines, stage one in blue
and stage two in orange everywhere) and returns the path it wrote.
"""
from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ich.labels import LABELS  # noqa: E402

from . import scores  # noqa: E402

DPI = 110
SHORT = {"epidural": "epidural", "intraparenchymal": "intraparench.", "intraventricular": "intraventr.",
         "subarachnoid": "subarachnoid", "subdural": "subdural", "any": "any"}
STAGE_ONE, STAGE_TWO, PRIOR = "#3467b0", "#e07b39", "#9a9a9a"
EXTRA = ["#5aa469", "#8e6bbf", "#c4515c", "#3aa6b9"]
LABEL_COLORS = dict(zip(LABELS, ["#c4515c", "#e07b39", "#d9b335", "#5aa469", "#3aa6b9", "#3467b0"]))
STYLE = {
    "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
    "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "axes.labelsize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#888888",
    "axes.grid": True, "grid.alpha": 0.25, "grid.linestyle": "-", "legend.frameon": False,
    "legend.fontsize": 9, "xtick.color": "#444444", "ytick.color": "#444444",
}


def model_colors(names) -> dict[str, str]:
    """Stage one blue, stage two orange, the prior grey, anything else from EXTRA."""
    out, extra = {}, iter(EXTRA * 4)
    for name in names:
        low = name.lower()
        out[name] = (PRIOR if "prior" in low else STAGE_TWO if "stage two" in low
                     else STAGE_ONE if "stage one" in low else next(extra))
    return out


def styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#777777", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


# --- 1. data overview ----------------------------------------------------------------------------

@styled
def label_overview(y: np.ndarray, path: Path) -> Path:
    """Prevalence per label (bars) and the 6x6 co-occurrence (share of row-label images with the column label)."""
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(12.5, 4.6), gridspec_kw={"width_ratios": [1, 1.05]})
    prevalence = y.mean(axis=0) * 100
    pos = np.arange(len(LABELS))[::-1]
    ax.barh(pos, prevalence, height=0.65, color=[LABEL_COLORS[c] for c in LABELS])
    for p, v, c in zip(pos, prevalence, y.sum(axis=0)):
        ax.text(v, p, f"  {v:.1f}%  ({int(c):,} slices)", va="center", fontsize=9)
    ax.set_yticks(pos, [SHORT[c] for c in LABELS])
    ax.set_xlim(0, max(prevalence.max(), 1) * 1.45)
    ax.set(xlabel="% of train slices positive", title=f"label prevalence ({len(y):,} train slices)")
    ax.grid(axis="y", alpha=0)

    counts = y.T @ y  # counts[i, j]: images positive for both i and j
    diag = np.diag(counts).copy()
    share = np.divide(counts, diag[:, None], out=np.zeros_like(counts), where=diag[:, None] > 0)
    im = hm.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            hm.text(j, i, f"{int(counts[i, j]):,}\n{share[i, j] * 100:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "#222222")
    hm.set_xticks(range(len(LABELS)), [SHORT[c] for c in LABELS], rotation=30, ha="right")
    hm.set_yticks(range(len(LABELS)), [SHORT[c] for c in LABELS])
    hm.grid(False)
    hm.set_title("co-occurrence: slices with both labels\n(% of the row label's positives)")
    fig.colorbar(im, ax=hm, fraction=0.046, pad=0.04, format=matplotlib.ticker.PercentFormatter(1.0))
    fig.tight_layout()
    return save(fig, path)


@styled
def slices_per_series(n_train: np.ndarray, path: Path, n_test: np.ndarray | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    all_n = np.concatenate([n_train] + ([n_test] if n_test is not None and len(n_test) else []))
    bins = np.arange(all_n.min() - 0.5, all_n.max() + 1.5, max(1, int(np.ceil((all_n.max() - all_n.min() + 1) / 40))))
    ax.hist(n_train, bins=bins, color=STAGE_ONE, alpha=0.85, label=f"train: {len(n_train)} series")
    if n_test is not None and len(n_test):
        ax.hist(n_test, bins=bins, color=STAGE_TWO, alpha=0.7, label=f"test: {len(n_test)} series")
    ax.axvline(np.median(n_train), color="#222222", ls="--", lw=1, label=f"train median {np.median(n_train):.0f}")
    ax.set(xlabel="slices in the series", ylabel="series", title="slices per series")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    return save(fig, path)


# --- 2. example slices -----------------------------------------------------------------------------

@styled
def window_examples(columns: list[tuple[str, np.ndarray | None]], window_names: list[str], path: Path) -> Path:
    """One column per example (title, HxWxC uint8 image or None), one row per cached window."""
    n_rows, n_cols = len(window_names), len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.95 * n_cols + 1.0, 2.05 * n_rows), squeeze=False)
    for c, (title, img) in enumerate(columns):
        for r, name in enumerate(window_names):
            ax = axes[r, c]
            if img is None:
                _no_data(ax, "no positive\nslice")
            else:
                ax.imshow(img[:, :, r], cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            if r == 0:
                ax.set_title(title, fontsize=9.5)
            if c == 0:
                ax.set_ylabel(f"{name}\nwindow", fontsize=10, rotation=0, ha="right", va="center", labelpad=8)
    fig.tight_layout(w_pad=0.3, h_pad=0.3)
    return save(fig, path)


@styled
def network_inputs(rows: list[tuple[str, np.ndarray, list[np.ndarray]]], channel_names: list[str], path: Path) -> Path:
    """Per row: each input channel, the three channels as RGB, then augmented draws (RGB)."""
    n_aug = max((len(a) for _, _, a in rows), default=0)
    n_cols = len(channel_names) + 1 + n_aug
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.75 * n_cols + 1.2, 1.9 * len(rows)), squeeze=False)
    for r, (title, img, augmented) in enumerate(rows):
        panels = [(img[:, :, c], f"channel {c}: {name}") for c, name in enumerate(channel_names)]
        panels.append((img[:, :, :3] if img.shape[2] >= 3 else img[:, :, 0], "as RGB"))
        panels += [(a[:, :, :3] if a.shape[2] >= 3 else a[:, :, 0], f"augmented #{i + 1}")
                   for i, a in enumerate(augmented)]
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if c >= len(panels):
                ax.axis("off")
                continue
            im, name = panels[c]
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=255)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(title, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
    fig.tight_layout(w_pad=0.3, h_pad=0.3)
    return save(fig, path)


# --- 3. training curves ----------------------------------------------------------------------------

@styled
def training_curves(history: pd.DataFrame, experiment: str, path: Path) -> Path:
    """Train loss, validation weighted log loss (prior dotted, kept epoch marked) and learning rate per fold."""
    has_lr = "lr" in history
    fig, axes = plt.subplots(1, 3 if has_lr else 2, figsize=(13 if has_lr else 9.5, 3.8))
    folds = sorted(history["fold"].unique())
    colors = plt.get_cmap("tab10")
    for i, k in enumerate(folds):
        h = history[history["fold"] == k].sort_values("epoch")
        color = colors(i % 10)
        axes[0].plot(h["epoch"], h["train_loss"], marker="o", ms=3, color=color, label=f"fold {k}")
        axes[1].plot(h["epoch"], h["val_wlogloss"], marker="o", ms=3, color=color, label=f"fold {k}")
        kept = h[h["kept"].astype(bool)].iloc[-1] if "kept" in h and h["kept"].astype(bool).any() else h.iloc[-1]
        axes[1].scatter([kept["epoch"]], [kept["val_wlogloss"]], s=90, facecolor="none", edgecolor=color, lw=1.5,
                        zorder=3)
        if "val_prior" in h:
            axes[1].axhline(h["val_prior"].iloc[0], ls=":", lw=1, color=color)
        if has_lr:
            axes[2].plot(h["epoch"], h["lr"], marker="o", ms=3, color=color, label=f"fold {k}")
    axes[0].set(title="train loss (weighted BCE)", xlabel="epoch")
    axes[1].set(title="validation weighted log loss", xlabel="epoch")
    axes[1].plot([], [], ls=":", color="#555555", label="prior baseline")
    axes[1].scatter([], [], s=90, facecolor="none", edgecolor="#555555", label="kept epoch (train.checkpoint)")
    if has_lr:
        axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(experiment, fontweight="bold")
    fig.tight_layout()
    return save(fig, path)


# --- 4. precision-recall -----------------------------------------------------------------------------

@styled
def pr_curves(y: np.ndarray, models: dict[str, np.ndarray], path: Path) -> Path:
    """One panel per label: precision-recall of each model, its 0.5 point (o) and its F1-best point (*)."""
    colors = model_colors(models)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.6))
    for j, (label, ax) in enumerate(zip(LABELS, axes.flat)):
        yj = y[:, j]
        if not (yj > 0).any():
            _no_data(ax, "no positive slices")
            ax.set_title(label)
            continue
        ax.axhline(yj.mean(), color=PRIOR, ls=":", lw=1, label=f"chance ({yj.mean() * 100:.1f}% positive)")
        for name, p in models.items():
            recall, precision = scores.pr_curve(yj, p[:, j])
            s = scores.label_scores(yj, p[:, j])
            ax.plot(recall, precision, color=colors[name], lw=1.8, label=f"{name}: AP {s['avg_precision']:.3f}")
            ax.plot(s["recall@0.5"], s["precision@0.5"], "o", color=colors[name], ms=6, mec="white")
            ax.plot(s["recall@best"], s["precision@best"], "*", color=colors[name], ms=12, mec="white")
        ax.set(xlim=(0, 1.01), ylim=(0, 1.03), title=f"{label} ({int(yj.sum())} positive)")
        if j % 3 == 0:
            ax.set_ylabel("precision")
        if j >= 3:
            ax.set_xlabel("recall")
        ax.legend(fontsize=7.5, loc="upper right")
    fig.suptitle("precision-recall (o: threshold 0.5, *: F1-best threshold)", fontweight="bold")
    fig.tight_layout()
    return save(fig, path)


# --- 5. calibration ---------------------------------------------------------------------------------

@styled
def calibration_curves(y: np.ndarray, models: dict[str, np.ndarray], path: Path, n_bins: int = 10) -> Path:
    """One panel per label: observed frequency against mean predicted probability per bin (marker ~ bin size)."""
    colors = model_colors(models)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for j, (label, ax) in enumerate(zip(LABELS, axes.flat)):
        yj = y[:, j]
        ax.plot([0, 1], [0, 1], color=PRIOR, ls="--", lw=1, label="perfectly calibrated")
        for name, p in models.items():
            mean_pred, frac_pos, counts = scores.calibration(yj, p[:, j], n_bins)
            ece = scores.expected_calibration_error(yj, p[:, j], n_bins)
            brier = float(np.mean((p[:, j] - yj) ** 2))
            ax.plot(mean_pred, frac_pos, "-", color=colors[name], lw=1.6, alpha=0.9)
            ax.scatter(mean_pred, frac_pos, s=12 + 120 * np.sqrt(counts / counts.max()), color=colors[name],
                       edgecolor="white", lw=0.6, zorder=3, label=f"{name}: ECE {ece:.3f}, Brier {brier:.3f}")
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"{label} ({int(yj.sum())} positive)",
               aspect="equal")
        if j % 3 == 0:
            ax.set_ylabel("observed frequency")
        if j >= 3:
            ax.set_xlabel("mean predicted probability")
        ax.legend(fontsize=7.5, loc="upper left")
    fig.suptitle(f"calibration ({n_bins} equal-width bins; marker area ~ slices in the bin)", fontweight="bold")
    fig.tight_layout()
    return save(fig, path)


# --- 6. log loss -------------------------------------------------------------------------------------

@styled
def log_loss_bars(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: per-label and weighted log loss of each model (lower is better)."""
    cols = [c for c in [*LABELS, "weighted"] if c in table.columns]
    names = list(table.index)
    colors = model_colors(names)
    fig, ax = plt.subplots(figsize=(12, 3.9))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(cols))
    for i, name in enumerate(names):
        vals = table.loc[name, cols].to_numpy(float)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width=width * 0.95, color=colors[name], label=name)
    ax.set_xticks(x, [SHORT.get(c, c) if c != "weighted" else "WEIGHTED" for c in cols])
    ax.axvline(len(cols) - 1.5, color="#cccccc", lw=1)
    ax.set(ylabel="log loss (lower is better)", title="out-of-fold log loss per label")
    ax.grid(axis="x", alpha=0)
    ax.legend(ncol=min(len(names), 4), loc="upper left")
    ax.set_ylim(0, table[cols].to_numpy(float).max() * 1.18)
    fig.tight_layout()
    return save(fig, path)


# --- 7. Grad-CAM -------------------------------------------------------------------------------------

@styled
def gradcam_grid(rows: list[tuple[str, list[dict]]], path: Path) -> Path:
    """rows: (subtype, cells); a cell has 'image' (HxW uint8), 'overlay' (HxWx3 uint8) and 'caption'.

    Each cell is drawn as the plain slice beside its Grad-CAM overlay.
    """
    n_cells = max((len(cells) for _, cells in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), 2 * n_cells, figsize=(1.55 * 2 * n_cells + 1.0, 2.05 * len(rows)),
                             squeeze=False)
    for r, (label, cells) in enumerate(rows):
        for c in range(n_cells):
            a_img, a_cam = axes[r, 2 * c], axes[r, 2 * c + 1]
            for ax in (a_img, a_cam):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            if c >= len(cells) or cells[c] is None:
                a_img.axis("off")
                a_cam.axis("off")
                if c == 0:
                    a_img.text(0.5, 0.5, "no example", ha="center", va="center", color="#777777",
                               transform=a_img.transAxes)
                continue
            cell = cells[c]
            a_img.imshow(cell["image"], cmap="gray", vmin=0, vmax=255)
            a_cam.imshow(cell["overlay"])
            color = "#2e7d32" if cell.get("kind") == "tp" else "#c62828"
            for ax in (a_img, a_cam):
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2)
            a_img.set_title(cell["caption"], fontsize=7.5, loc="left", color=color)
        axes[r, 0].set_ylabel(label, fontsize=9.5, rotation=0, ha="right", va="center", labelpad=8)
    fig.tight_layout(w_pad=0.2, h_pad=0.6)
    return save(fig, path)
