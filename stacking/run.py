"""Stage two end to end: read stage-one outputs, check folds, features, boosting, outputs.

Reads MODEL_CHECKPOINT_DIR/<experiment>/oof.parquet (+ oof_emb.npy when PCA
features are on) for every configured experiment, and test.parquet /
test_emb.npy when test predictions are wanted. Writes to
MODEL_CHECKPOINT_DIR/stacking/<name>/: oof.parquet, test.parquet,
boosters/<label>_fold<k>.txt, config.json; and to LOGS_DIR/stacking/<name>/:
metrics.csv (the log-loss table) and feature_importance.png.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from ich.cache import write_atomic
from ich.labels import LABELS
from ich.metric import log_loss_table

from .config import PredictCfg
from .features import build_features
from .model import fit_predict


class StackingError(RuntimeError):
    """Stage two cannot go on; the message says what is missing."""


def _aligned(path: Path, image_ids: pd.Series, what: str) -> tuple[np.ndarray, np.ndarray]:
    table = pd.read_parquet(path)
    pos = pd.Series(np.arange(len(table)), index=table["image_id"])
    missing = ~image_ids.isin(pos.index)
    if missing.any():
        raise StackingError(f"{path} has no {what} prediction for {int(missing.sum())} images "
                            f"(e.g. {image_ids[missing].iloc[0]}): rerun that stage")
    return table[list(LABELS)].to_numpy(np.float32)[pos.loc[image_ids].to_numpy()], pos.loc[image_ids].to_numpy()


def check_folds(exp_dir: Path, slices: pd.DataFrame) -> None:
    """Stage one's held-out sets must be exactly slices.parquet's folds, or OOF features leak."""
    for k in sorted(slices["fold"].unique()):
        piece = exp_dir / f"fold{k}.oof.parquet"
        if not piece.is_file():
            raise StackingError(f"{piece} missing: stage one of {exp_dir.name} is not finished")
        held = set(pd.read_parquet(piece, columns=["image_id"])["image_id"])
        if held != set(slices.loc[slices["fold"] == k, "image_id"]):
            raise StackingError(f"{exp_dir.name}: fold {k} of stage one differs from slices.parquet's fold {k}; "
                                "stage two must use the same patient folds (retrain stage one)")


def load_stage_one(cfg: PredictCfg, model_dir: Path, slices: pd.DataFrame, split: str):
    """probs[exp] and emb[exp] (raw embeddings or None), rows aligned with slices."""
    probs, embs = {}, {}
    for exp in cfg.experiments:
        d = model_dir / exp
        path = d / ("oof.parquet" if split == "train" else "test.parquet")
        if not path.is_file():
            hint = "train.py" if split == "train" else "predict.py (stage one on test)"
            raise StackingError(f"{path} not found: run {hint} for experiment {exp} first")
        if split == "train":
            check_folds(d, slices)
        probs[exp], rows = _aligned(path, slices["image_id"], f"{split} stage-one")
        if cfg.pca_components:
            emb_path = d / ("oof_emb.npy" if split == "train" else "test_emb.npy")
            embs[exp] = np.load(emb_path, mmap_mode="r")[rows].astype(np.float32)
    return probs, embs


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


def run_stacking(cfg: PredictCfg, *, train_slices: pd.DataFrame, test_slices: pd.DataFrame | None,
                 model_dir: Path, logs_dir: Path, progress: bool = True, log=print) -> dict:
    train_probs, train_embs = load_stage_one(cfg, model_dir, train_slices, "train")
    test_probs = test_embs = None
    if test_slices is not None:
        test_probs, test_embs = load_stage_one(cfg, model_dir, test_slices, "test")

    if cfg.pca_components:  # fit on train embeddings only, apply to both
        for exp in cfg.experiments:
            pca = PCA(cfg.pca_components, random_state=0)
            sample = train_embs[exp][np.random.default_rng(0).permutation(len(train_embs[exp]))[:100_000]]
            pca.fit(sample)
            train_embs[exp] = pca.transform(train_embs[exp])
            if test_embs is not None:
                test_embs[exp] = pca.transform(test_embs[exp])

    X, names = build_features(train_slices, train_probs, k=cfg.k_neighbors, embeddings=train_embs or None,
                              neighbors=cfg.neighbors)
    X_test = None
    if test_slices is not None:
        X_test, _ = build_features(test_slices, test_probs, k=cfg.k_neighbors, embeddings=test_embs or None,
                                   neighbors=cfg.neighbors)
    y = train_slices[list(LABELS)].to_numpy(np.float64)
    folds = train_slices["fold"].to_numpy()
    log(f"stage two: {X.shape[0]} train rows x {X.shape[1]} features from {', '.join(cfg.experiments)}"
        + (f"; {X_test.shape[0]} test rows" if X_test is not None else ""))
    base = np.mean(list(train_probs.values()), axis=0) if cfg.start_from_stage_one else None
    base_test = np.mean(list(test_probs.values()), axis=0) if base is not None and test_probs else None
    res = fit_predict(X, y, folds, X_test, params=cfg.lgb_params, feature_names=names,
                      num_boost_round=cfg.num_boost_round, early_stopping_rounds=cfg.early_stopping_rounds,
                      progress=progress, base=base, base_test=base_test)

    out_dir, log_dir = model_dir / "stacking" / cfg.name, logs_dir / "stacking" / cfg.name
    (out_dir / "boosters").mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for (label, k), booster in res.boosters.items():
        booster.save_model(str(out_dir / "boosters" / f"{label}_fold{k}.txt"), num_iteration=booster.best_iteration)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    oof = pd.DataFrame(res.oof, columns=list(LABELS))
    oof.insert(0, "image_id", train_slices["image_id"].to_numpy())
    write_atomic(out_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    result = {"out_dir": out_dir, "oof": oof}
    if X_test is not None:
        test = pd.DataFrame(res.test, columns=list(LABELS))
        test.insert(0, "image_id", test_slices["image_id"].to_numpy())
        write_atomic(out_dir / "test.parquet", lambda p: test.to_parquet(p, index=False))
        result["test"] = test

    rows = dict(train_probs)
    if len(train_probs) > 1:
        rows["mean of stage one"] = np.mean(list(train_probs.values()), axis=0)
    rows["stage two"] = res.oof
    table = log_loss_table(y, folds, rows)
    table.to_csv(log_dir / "metrics.csv")
    result["metrics"] = table
    result["importance_plot"] = importance_plot(names, res.importance, log_dir / "feature_importance.png")
    log("out-of-fold weighted log loss (lower is better):\n" + format_table(table))
    return result


def format_table(table: pd.DataFrame) -> str:
    short = {"epidural": "epidural", "intraparenchymal": "intraparen", "intraventricular": "intravent",
             "subarachnoid": "subarach", "subdural": "subdural", "any": "any", "weighted": "WEIGHTED"}
    head = f"{'':22s}" + "".join(f"{short[c]:>11s}" for c in table.columns)
    lines = [head]
    for name, row in table.iterrows():
        lines.append(f"{name[:22]:22s}" + "".join(f"{v:11.4f}" for v in row.to_numpy()))
    return "\n".join(lines)
