"""The report's seven sections: each reads its inputs, draws its figures and fills a Section.

A builder raises `Unavailable` when its main input is missing (the page then
shows a one-line "not available: run X" note); an input that only part of a
section needs (stage two beside stage one, the test split beside train)
becomes a note inside the section.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ich.dicom_rows import split_images
from ich.labels import LABELS, SUBTYPES
from ich.metric import log_loss_table

from . import figures, html, scores
from .html import Section
from .inputs import Inputs, Unavailable


@dataclass
class Context:
    inputs: Inputs
    png_dir: Path
    gradcam_tp: int = 2      # most confident true positives per subtype
    gradcam_fp: int = 2      # worst false positives per subtype

    def png(self, name: str) -> Path:
        return self.png_dir / f"{name}.png"


def _split_summary(ctx: Context, split: str) -> dict | None:
    try:
        s = ctx.inputs.slices(split)
    except Unavailable:
        return None
    fixes = s["fixes"].fillna("").astype(str).str.split() if "fixes" in s else pd.Series([[]] * len(s))
    row = {"split": split, "slices used": len(s), "series": s["series_id"].nunique(),
           "patients": s["patient_id"].nunique()}
    try:
        row["files rejected"] = len(ctx.inputs.rejected(split))
    except Unavailable:
        row["files rejected"] = float("nan")
    row["fix: bits12"] = int(fixes.map(lambda f: "bits12" in f).sum())
    row["fix: padding"] = int(fixes.map(lambda f: "padding" in f).sum())
    row["no fix needed"] = int(fixes.map(len).eq(0).sum())
    return row


def data_overview(ctx: Context, sec: Section) -> None:
    inp = ctx.inputs
    train = inp.slices("train")
    y = train[list(LABELS)].to_numpy(np.float64)
    sec.blocks.append(html.figure(figures.label_overview(y, ctx.png("data_labels")),
                                  "Left: share of train slices positive per label. Right: each cell counts the "
                                  "slices positive for both the row and the column label, and gives that count as "
                                  "a share of the row label's positives."))
    n_train = train.groupby("series_id")["n_slices"].first().to_numpy()
    n_test = None
    try:
        n_test = inp.slices("test").groupby("series_id")["n_slices"].first().to_numpy()
    except Unavailable as exc:
        sec.blocks.append(html.note(f"test split: {exc}"))
        sec.status = "partial"
    sec.blocks.append(html.figure(figures.slices_per_series(n_train, ctx.png("data_series"), n_test),
                                  "Slices per series (one count per series)."))

    rows = [r for r in (_split_summary(ctx, s) for s in ("train", "test")) if r]
    sec.blocks.append(html.heading("Slices, fixes and rejected files"))
    sec.blocks.append(html.table(pd.DataFrame(rows), index=False, digits=0,
                                 caption="`bits12`: 12-bit files with a wrong RescaleIntercept, shifted and wrapped; "
                                         "`padding`: outside-scanner padding (-2000) clipped to air."))
    rejected = []
    for split in ("train", "test"):
        try:
            r = inp.rejected(split)
        except Unavailable as exc:
            sec.blocks.append(html.note(f"{split} split: {exc}"))
            sec.status = "partial"
            continue
        for reason, g in r.groupby("reason", sort=True):
            detail = g["detail"].dropna().astype(str) if "detail" in g else pd.Series(dtype=str)
            rejected.append({"split": split, "reason": reason, "files": len(g),
                             "example": str(g["file"].iloc[0]) if "file" in g else "",
                             "detail (first)": (detail.iloc[0][:90] if len(detail) else "")})
    if rejected:
        sec.blocks.append(html.table(pd.DataFrame(rejected), index=False, digits=0,
                                     caption="Files prepare_data.py could not use, by reason (README: "
                                             "Rejected files)."))
    else:
        sec.blocks.append(html.paragraph("No file was rejected."))


def _example_rows(slices: pd.DataFrame) -> list[tuple[str, int | None]]:
    """One slice per subtype (fewest other subtypes, then most brain), plus one without hemorrhage."""
    other = slices[list(SUBTYPES)].sum(axis=1)
    brain = slices["brain_fraction"] if "brain_fraction" in slices else pd.Series(0.0, index=slices.index)
    rows = []
    for label in SUBTYPES:
        cand = slices.index[slices[label] > 0]
        if len(cand) == 0:
            rows.append((label, None))
            continue
        key = pd.DataFrame({"other": other[cand], "brain": -brain[cand]}).sort_values(["other", "brain"],
                                                                                       kind="stable")
        rows.append((label, int(slices.index.get_loc(key.index[0]))))
    neg = slices.index[slices["any"] == 0]
    if len(neg):
        rows.append(("no hemorrhage", int(slices.index.get_loc(brain[neg].idxmax()))))
    return rows


def examples(ctx: Context, sec: Section) -> None:
    inp = ctx.inputs
    train = inp.slices("train").reset_index(drop=True)
    windows = inp.windows("train")
    images = split_images(inp.clean_dir("train"), inp.settings.raw_data_dir, train)
    picks = _example_rows(train)
    rows = [(f"{title}\n{train['image_id'].iloc[i]}" if i is not None else title,
             np.asarray(images[train["cache_row"].iloc[i]]) if i is not None else None) for title, i in picks]
    sec.blocks.append(html.figure(figures.window_examples(
        rows, windows or [f"channel {c}" for c in range(images.shape[3])], ctx.png("examples_windows")),
                                  "One train slice per subtype (preferring slices with that subtype alone), as "
                                  f"cached by prepare_data.py ({images.shape[1]} px, windows: "
                                  f"{', '.join(windows)})."))

    from models.config import from_dict

    exp = inp.experiments[0]
    try:
        cfg = from_dict(inp.experiment_config(exp), where=exp)
    except Unavailable as exc:
        sec.blocks.append(html.note(f"the network's input: {exc}"))
        sec.status = "partial"
        return
    from models.augment import build_train_transform  # torch and albumentations: only once there is a model
    from models.data import SliceDataset, with_neighbors

    table = with_neighbors(train)
    dataset = SliceDataset(table, inp.clean_dir("train"), mode=cfg.input.mode, channel=cfg.input.adjacent_channel,
                           size=cfg.final_size, images=images)
    if cfg.input.mode == "adjacent":
        w = windows[cfg.input.adjacent_channel] if cfg.input.adjacent_channel < len(windows) else "window"
        channels = [f"slice i-1 ({w})", f"slice i ({w})", f"slice i+1 ({w})"]
    else:
        channels = windows[:dataset.image(0).shape[2]]
    transform = build_train_transform(cfg.augment)
    if transform is not None:
        transform.set_random_seed(0)
    shown = [(t, i) for t, i in picks if i is not None]
    shown = [p for p in shown if p[0] != "no hemorrhage"][:2] + [p for p in shown if p[0] == "no hemorrhage"][:1]
    net_rows = []
    for title, i in shown:
        img = dataset.image(i)
        aug = [transform(image=img)["image"] for _ in range(3)] if transform is not None else []
        net_rows.append((title, img, aug))
    aug_text = ("augmented draws from the training transform" if transform is not None
                else "no augmentation is configured")
    sec.blocks.append(html.heading(f"Stage-one input: {exp} (mode {cfg.input.mode}, {cfg.final_size} px)"))
    sec.blocks.append(html.figure(
        figures.network_inputs(net_rows, channels, ctx.png("examples_network_input")),
        f"`models.data.SliceDataset.image(i)` for experiment `{exp}`: each channel, the three as RGB, and "
        f"{aug_text} (`augment` in the experiment config)."))


def training(ctx: Context, sec: Section) -> None:
    found = 0
    for exp in ctx.inputs.experiments:
        try:
            h = ctx.inputs.history(exp)
        except Unavailable as exc:
            sec.blocks.append(html.note(str(exc)))
            continue
        found += 1
        sec.blocks.append(html.figure(figures.training_curves(h, exp, ctx.png(f"training_{exp}")),
                                      f"`{exp}`: one line per fold."))
        best = h.loc[h.groupby("fold")["val_wlogloss"].idxmin()]
        cols = {"fold": "fold", "epoch": "best epoch", "val_wlogloss": "val weighted log loss",
                "val_prior": "prior baseline", "train_loss": "train loss"}
        t = best[[c for c in cols if c in best]].rename(columns=cols)
        t["epochs run"] = h.groupby("fold")["epoch"].max().to_numpy()
        if "seconds" in h:
            t["minutes"] = (h.groupby("fold")["seconds"].sum() / 60).to_numpy()
        sec.blocks.append(html.table(t, index=False, digits={"minutes": 1}, best_low=["val weighted log loss"]))
    if not found:
        raise Unavailable(" ".join(f"{exp}: run `{ctx.inputs.commands.train(exp)}`."
                                   for exp in ctx.inputs.experiments))
    if found < len(ctx.inputs.experiments):
        sec.status = "partial"


def _models(ctx: Context, sec: Section) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and {each experiment (when several), stage one (their mean), stage two (when it has run)}."""
    inp = ctx.inputs
    y = inp.labels()
    name, p1 = inp.stage_one()
    models = {}
    if len(inp.experiments) > 1:
        models.update({f"{exp}": inp.oof(exp) for exp in inp.experiments})
    models[name] = p1
    try:
        models["stage two"] = inp.stage_two()
    except Unavailable as exc:
        sec.blocks.append(html.note(str(exc)))
        sec.status = "partial"
    return y, models


def per_label(ctx: Context, sec: Section) -> None:
    y, models = _models(ctx, sec)
    sec.blocks.append(html.figure(figures.pr_curves(y, models, ctx.png("per_label_pr")),
                                  "Precision-recall per label, out of fold (dotted: a random ranking)."))
    t = scores.scores_table(y, models)
    t = t.rename(columns={"roc_auc": "ROC AUC", "avg_precision": "avg precision", "precision@0.5": "P @0.5",
                          "recall@0.5": "R @0.5", "f1@0.5": "F1 @0.5", "best_threshold": "F1-best threshold",
                          "precision@best": "P @best", "recall@best": "R @best", "f1@best": "F1 @best"})
    sec.blocks.append(html.table(t, index=False, digits=3, group_by="label",
                                 best_high=["ROC AUC", "avg precision", "F1 @0.5", "F1 @best"],
                                 caption="P / R / F1: precision, recall and F1 at threshold 0.5 and at each "
                                         "model's F1-best threshold (–: undefined, e.g. no slice above 0.5); "
                                         "bold: the best model per label."))


def calibration(ctx: Context, sec: Section) -> None:
    y, models = _models(ctx, sec)
    sec.blocks.append(html.figure(figures.calibration_curves(y, models, ctx.png("calibration")),
                                  "`sklearn.calibration.calibration_curve`, out-of-fold probabilities; ECE: "
                                  "expected calibration error (mean gap to the diagonal, weighted by bin size)."))


def log_loss(ctx: Context, sec: Section) -> None:
    inp = ctx.inputs
    try:
        table = inp.metrics_csv()
        source = f"`{inp.stack_log_dir / 'metrics.csv'}`, written by predict.py"
    except Unavailable as exc:
        models = inp.available_oofs()
        if not models:
            raise Unavailable(" ".join(f"{exp}: run `{inp.commands.train(exp)}`." for exp in inp.experiments)) \
                from None
        if len(models) > 1:
            models["mean of stage one"] = np.mean(list(models.values()), axis=0)
        try:
            models["stage two"] = inp.stage_two()
        except Unavailable:
            pass
        train = inp.slices("train")
        table = log_loss_table(inp.labels(), train["fold"].to_numpy(), models)
        sec.blocks.append(html.note(f"{exc} (the table below is computed here from the out-of-fold files "
                                    "that exist)"))
        sec.status = "partial"
        source = "computed by report.py with `ich.metric`"
    cols = [c for c in [*LABELS, "weighted"] if c in table.columns]
    table = table[cols]
    optimistic = table.index.str.contains("optimistic")  # a comparison row, not a model to pick
    if optimistic.any():
        for name, row in table[optimistic].iterrows():
            sec.blocks.append(html.paragraph(f"Not in the table: {name}, weighted {row['weighted']:.4f}. The "
                                             "stage-two rows pick each fold's number of boosting rounds (or "
                                             "epochs, and the blend's weights) on the other folds, so nothing "
                                             "in them was chosen on the fold they score."))
        table = table[~optimistic]
    sec.blocks.append(html.table(table.rename(columns={"weighted": "WEIGHTED"}), digits=4,
                                 best_low=[c if c != "weighted" else "WEIGHTED" for c in cols],
                                 caption=f"Per-label and weighted log loss; source: {source}."))
    sec.blocks.append(html.figure(figures.log_loss_bars(table, ctx.png("log_loss")), "The same table as bars."))


def gradcam(ctx: Context, sec: Section) -> None:
    inp = ctx.inputs
    exp = inp.experiments[0]
    train = inp.slices("train").reset_index(drop=True)
    probs = inp.oof(exp)
    folds = sorted(int(k) for k in train["fold"].unique())
    for k in folds:
        inp.fold_checkpoint(exp, k)  # every fold model present, or a note naming the missing one
    from models import gradcam as gc  # torch and pytorch_grad_cam: imported once there is something to explain

    examples = gc.pick_examples(train, probs, ctx.gradcam_tp, ctx.gradcam_fp)
    examples = gc.explain(examples, slices=train, clean_dir=inp.clean_dir("train"),
                          checkpoint_for=lambda k: inp.fold_checkpoint(exp, k),
                          images=split_images(inp.clean_dir("train"), inp.settings.raw_data_dir, train))
    rows, n = [], 0
    for label in SUBTYPES:
        cells = []
        for ex in (e for e in examples if e["label"] == label):
            if ex["kind"] == "tp":
                what = "TP" if ex["prob"] >= 0.5 else "positive (<0.5)"
            else:
                what = "FP" if ex["prob"] >= 0.5 else "negative"
            n += 1
            name = f"{label}_{ex['kind']}{sum(c['kind'] == ex['kind'] for c in cells) + 1}_{ex['image_id']}"
            gc.save_overlay(ex, ctx.png_dir / "gradcam" / f"{name}.png")
            empty = " · empty CAM" if float(ex["cam"].max()) <= 0 else ""
            cells.append({**ex, "caption": f"{what}  p={ex['prob']:.2f}{empty}\n{ex['image_id']} · fold {ex['fold']}"})
        rows.append((label, cells))
    layer = next((e["layer"] for e in examples if "layer" in e), "?")
    sec.blocks.append(html.figure(
        figures.gradcam_grid(rows, ctx.png("gradcam")),
        f"Each pair: the slice and its Grad-CAM for that subtype's output, computed with the fold model that held "
        f"the image out ({n} overlays; each also saved under `gradcam/`); an all-blue overlay (empty CAM) means no "
        f"location raised that output. Target layer: `{layer}`; "
        "`pytorch_grad_cam.GradCAM` with `ClassifierOutputTarget`.", attrs={"data-overlays": str(n)}))


@dataclass(frozen=True)
class Spec:
    id: str
    title: str
    lead: str      # formatted with ctx (e.g. {exp}, {tp}, {fp})
    build: object  # build(ctx, sec) -> None; raises Unavailable when its main input is missing


SECTIONS = [
    Spec("data", "Data overview",
         "How rare each hemorrhage is and how often subtypes share a slice (the weighted log loss is dominated by "
         "`any` and the common subtypes), how long the series are (stage two's neighbor features need several "
         "slices), and what prepare_data.py had to fix or reject.", data_overview),
    Spec("examples", "Example slices and the network's input",
         "Each subtype in each cached window: epidural and subdural blood shows best in the subdural window, "
         "intraparenchymal and intraventricular blood in the brain window. Below, the exact tensor stage one "
         "trains on, and what augmentation does to it.", examples),
    Spec("training", "Training curves",
         "Validation loss should fall well below the dotted prior baseline and flatten; a validation curve that "
         "turns up while the train loss keeps falling is overfitting (the circled best epoch is the one kept in "
         "`fold{{k}}.pt`). Folds that disagree a lot point at too little data per fold.", training),
    Spec("per-label", "Per-label scores",
         "Ranking quality (ROC AUC, average precision) and the precision-recall trade-off of each label, out of "
         "fold. The F1-best threshold shows where a yes/no decision would be drawn; for rare labels it sits far "
         "from 0.5. Stage two should move every curve up and to the right.", per_label),
    Spec("calibration", "Calibration",
         "Log loss punishes confident mistakes, so probabilities must mean what they say: points on the diagonal "
         "are calibrated, points below it are over-confident, above it under-confident.", calibration),
    Spec("log-loss", "Weighted log loss (the competition metric)",
         "Out-of-fold weighted log loss (weight 2 on `any`), the number the leaderboard ranks: lower is better, "
         "and a model no better than the prior baseline (each label at its training frequency) has learned "
         "nothing. Bold: the best model per column.", log_loss),
    Spec("grad-cam", "Where the network looks (Grad-CAM)",
         "For each subtype, the {tp} positives ranked highest (green) and the {fp} negatives ranked highest, the "
         "worst false positives (red), by `{exp}`'s out-of-fold probability. The heat should sit on the blood; "
         "heat on the skull, the scanner table or the image border is a shortcut.", gradcam),
]
