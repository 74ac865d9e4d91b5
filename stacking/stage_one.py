"""Stage one's outputs as stage two reads them (ARCHITECTURE.md, contract 2).

Reads MODEL_CHECKPOINT_DIR/<experiment>/oof.parquet (+ oof_emb.npy when PCA
features are on) for every configured experiment, and, when test predictions
are wanted, test_fold{k}.parquet (+ test_fold{k}_emb.npy) of every stage-one
fold model k, never the fold-averaged test.parquet / test_emb.npy: every
feature vector a stage-two member sees comes from one stage-one model, at
training and at test time alike (`load_stage_one`, `fold_model_view`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ich import stage_one as files
from ich.labels import LABELS

from .config import PredictCfg
from .model import logit
from .pca import ALIGN_WIDTH, common_components, fit_signed_pca, standardized

ANY = LABELS.index("any")
COMMON_ROWS = 20_000  # test images on which the fold models' PCAs are aligned


class StackingError(RuntimeError):
    """Stage two cannot go on; the message says what is missing."""


def _aligned(path: Path, image_ids: pd.Series, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(probabilities in image_ids order, their rows in the file, the file's row count)."""
    table = pd.read_parquet(path)
    index = pd.Index(table["image_id"])
    if not index.is_unique:
        raise StackingError(f"{path} holds some image_id twice: rerun that stage")
    rows = index.get_indexer(image_ids)  # 7x faster than Series.isin + .loc on 750,000 string ids
    missing = rows < 0
    if missing.any():
        raise StackingError(f"{path} has no {what} prediction for {int(missing.sum())} images "
                            f"(e.g. {image_ids[missing].iloc[0]}): rerun that stage")
    return table[list(LABELS)].to_numpy(np.float32)[rows], rows, len(table)


def check_folds(exp_dir: Path, slices: pd.DataFrame) -> None:
    """Stage one's held-out sets must be exactly slices.parquet's folds, or OOF features leak."""
    for k in sorted(slices["fold"].unique()):
        piece = files.fold_oof(exp_dir, k)
        if not piece.is_file():
            raise StackingError(f"{piece} missing: stage one of {exp_dir.name} is not finished")
        held = pd.Index(pd.read_parquet(piece, columns=["image_id"])["image_id"])
        expected = slices.loc[slices["fold"] == k, "image_id"]
        if len(held) != len(expected) or not held.is_unique or (held.get_indexer(expected) < 0).any():
            raise StackingError(f"{exp_dir.name}: fold {k} of stage one differs from slices.parquet's fold {k}; "
                                "stage two must use the same patient folds (retrain stage one)")


@dataclass
class StageOne:
    """What stage one hands stage two for one set of rows, per experiment (rows aligned with slices)."""
    probs: dict[str, np.ndarray]                            # (n, 6) probabilities
    pcs: dict[str, np.ndarray] = field(default_factory=dict)  # (n, cfg.pca_width); empty without PCA
    pca_models: dict = field(default_factory=dict)  # (experiment, fold k) -> AlignedPCA of fold model k (train view)

    def first_pcs(self, c: int) -> dict[str, np.ndarray]:
        """Each experiment's first c aligned components: LightGBM reads cfg.pca_components of them, the
        sequence member cfg.sequence_pca_components (both <= cfg.pca_width, the width fitted)."""
        return {exp: p[:, :c] for exp, p in self.pcs.items()} if c else {}


def _test_fold_path(exp_dir: Path, k: int, emb: bool = False) -> Path:
    path = (files.fold_test_embeddings if emb else files.fold_test_probs)(exp_dir, k)
    if not path.is_file():
        raise StackingError(f"{path} not found: stage two needs the test outputs of each stage-one fold model "
                            f"of {exp_dir.name} (test_fold{{k}}.parquet and test_fold{{k}}_emb.npy, not the "
                            "fold-averaged test.parquet); run predict.py (stage one on test) again, with --force "
                            "if it reuses older test outputs")
    return path


def _embeddings(path: Path, rows: np.ndarray, n_expected: int) -> np.ndarray:
    if not path.is_file():
        raise StackingError(f"{path} not found: PCA features (pca_components) need stage one's embeddings; "
                            "rerun that stage or set pca_components: 0")
    emb = np.load(path, mmap_mode="r")
    if len(emb) != n_expected:
        raise StackingError(f"{path} has {len(emb)} rows, its predictions {n_expected}: rerun that stage")
    return np.asarray(emb[rows], dtype=np.float32)


def load_stage_one(cfg: PredictCfg, model_dir: Path, train_slices: pd.DataFrame,
                   test_slices: pd.DataFrame | None = None) -> tuple[StageOne, dict[int, StageOne] | None]:
    """The OOF view of the train rows and one view of the test rows per stage-one fold model.

    Train: each experiment's oof.parquet, whose fold-k rows come from fold
    model k (checked against slices.parquet's folds). Test: per fold k,
    test_fold{k}.parquet of every experiment, i.e. fold model k's outputs,
    so that test features come from one stage-one model as the OOF ones do;
    the fold-averaged test.parquet / test_emb.npy are never read (their
    averaged probabilities are less extreme, and averaged embeddings of
    differently oriented spaces are not embeddings of anything).
    With pca_width (the widest of pca_components and, with the sequence
    member, sequence.pca_components), one PCA per (experiment, fold model k), fitted on
    that model's own OOF rows (fold k) and applied to them and to that
    model's test embeddings (`fit_signed_pca`); a single PCA of the OOF rows
    of all fold models would mix K differently oriented spaces. With test
    slices, the K PCAs (of ALIGN_WIDTH x pca_width dimensions) of an
    experiment are then rotated into one frame on the test images, which
    every fold model has scored (unlabeled, so no label reaches stage two
    through it), and one PCA of the aligned OOF rows picks the components
    every fold model shares (`common_components`). Without test slices (an
    OOF-only run) each fold model keeps its own components, signs fixed.
    Returns (train view, {k: test view of fold model k}) (None without test_slices).
    """
    folds = train_slices["fold"].to_numpy()
    fold_ids = [int(k) for k in sorted(np.unique(folds))]
    train = StageOne({})
    for exp in cfg.experiments:
        d = model_dir / exp
        if not (d / "oof.parquet").is_file():
            raise StackingError(f"{d / 'oof.parquet'} not found: run train.py for experiment {exp} first")
        check_folds(d, train_slices)
        train.probs[exp], rows, n_oof = _aligned(d / "oof.parquet", train_slices["image_id"], "train stage-one")
        if not cfg.pca_width:
            continue
        c = cfg.pca_width  # the widest reader's components (LightGBM's, or the sequence member's)
        align = test_slices is not None and cfg.pca_alignment == "procrustes"
        width = None  # each fold model's own components: ALIGN_WIDTH x c when they are aligned on test images
        pcs, models = None, {}
        for k in fold_ids:
            held = np.flatnonzero(folds == k)
            emb = _embeddings(d / "oof_emb.npy", rows[held], n_oof)
            if width is None:
                width = min(ALIGN_WIDTH * c, emb.shape[1], len(held)) if align else c
                pcs = np.empty((len(train_slices), width), dtype=np.float32)
            models[k] = fit_signed_pca(emb, logit(train.probs[exp][held, ANY]), width)
            pcs[held] = models[k].transform(emb)
        if align:
            common = _common_scores(d, test_slices, models)
            models, pcs = common_components(pcs, folds, models, common, logit(train.probs[exp][:, ANY]), c)
        if cfg.pca_standardize:
            for k in fold_ids:
                own = pcs[folds == k]
                models[k] = standardized(models[k], own)
                pcs[folds == k] = (own - own.mean(axis=0)) / np.where(own.std(axis=0) > 1e-6, own.std(axis=0), 1.0)
        train.pcs[exp] = pcs
        train.pca_models.update({(exp, k): m for k, m in models.items()})
    if test_slices is None:
        return train, None
    return train, {k: fold_model_view(cfg, model_dir, test_slices, k, train.pca_models) for k in fold_ids}


def _common_scores(exp_dir: Path, test_slices: pd.DataFrame, models: dict, max_rows: int = COMMON_ROWS) -> dict:
    """Each fold model's scores (its own PCA) of the same up to max_rows test images (a fixed sample)."""
    rows = np.sort(np.random.default_rng(0).permutation(len(test_slices))[:max_rows])
    ids = test_slices["image_id"].iloc[rows]
    scores = {}
    for k, model in models.items():
        _, r, n = _aligned(_test_fold_path(exp_dir, k), ids, f"fold {k} test stage-one")
        scores[k] = model.transform(_embeddings(_test_fold_path(exp_dir, k, emb=True), r, n))
    return scores


def fold_model_view(cfg: PredictCfg, model_dir: Path, slices: pd.DataFrame, k: int, pca_models: dict) -> StageOne:
    """What stage-one fold model k of every experiment says about `slices` (its test_fold{k} outputs),
    with its embeddings through that model's own PCA (`pca_models[(experiment, k)]`)."""
    outputs = {}
    for exp in cfg.experiments:
        d = model_dir / exp
        probs, rows, n = _aligned(_test_fold_path(d, k), slices["image_id"], f"fold {k} test stage-one")
        emb = _embeddings(_test_fold_path(d, k, emb=True), rows, n) if cfg.pca_width else None
        outputs[exp] = (probs, emb)
    return view_of(cfg, outputs, k, pca_models)


def view_of(cfg: PredictCfg, outputs: dict, k: int, pca_models: dict) -> StageOne:
    """Fold model k's outputs on some rows ({experiment: (probabilities, embeddings or None)}, rows
    aligned) -> the view stage two reads: the probabilities, and the embeddings through that fold model's
    own aligned PCA. The one place both the file path above and the in-memory engine
    (pipeline.engine) make it."""
    view = StageOne({})
    for exp in cfg.experiments:
        probs, emb = outputs[exp]
        view.probs[exp] = np.asarray(probs, np.float32)
        if cfg.pca_width:
            view.pcs[exp] = pca_models[exp, k].transform(np.asarray(emb, np.float32))
    return view


def mean_probs(view: StageOne) -> np.ndarray:
    """The mean over experiments of a view's stage-one probabilities: where both members start from."""
    return np.mean(list(view.probs.values()), axis=0)
