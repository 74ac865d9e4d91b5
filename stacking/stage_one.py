"""Stage one's outputs as stage two reads them (ARCHITECTURE.md, contract 2).

Reads MODEL_CHECKPOINT_DIR/<experiment>/oof.parquet (+ oof_emb.npy when PCA
features are on) for every configured experiment, and, when test predictions
are wanted, test_fold{k}.parquet (+ test_fold{k}_pcs.npy, the kept PCA
scores, or test_fold{k}_emb.npy) of every stage-one fold model k, never the
fold-averaged test.parquet / test_emb.npy: every
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
    """Rows of a row-aligned .npy of stage one (embeddings, or kept PCA scores) as float32."""
    if not path.is_file():
        raise StackingError(f"{path} not found: PCA features (pca_components) need stage one's embeddings, or "
                            "for test their PCA scores made with this config's PCA settings (test_pca.joblib); "
                            "rerun that stage (predict.py with this config: stage one on test) or set "
                            "pca_components: 0")
    emb = np.load(path, mmap_mode="r")
    if len(emb) != n_expected:
        raise StackingError(f"{path} has {len(emb)} rows, its predictions {n_expected}: rerun that stage")
    return np.asarray(emb[rows], dtype=np.float32)


def test_pca_spec(cfg: PredictCfg) -> dict:
    """What the PCAs of stage one's kept test scores must match for stage two to read those scores."""
    return {"pca_width": cfg.pca_width, "pca_standardize": cfg.pca_standardize, "pca_alignment": cfg.pca_alignment}


def kept_of_test(cfg: PredictCfg):
    """What stage one on test keeps of each fold model's embeddings (ich.stage_one.outputs_key's `kept`):
    None without PCA features, the PCA's spec for aligned scores (cfg.keeps_test_scores), else "embeddings"."""
    if not cfg.pca_width:
        return None
    return test_pca_spec(cfg) if cfg.keeps_test_scores else "embeddings"


def _oof(cfg: PredictCfg, exp_dir: Path, train_slices: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """One experiment's OOF probabilities in train_slices order, their rows in oof.parquet, its row count."""
    if not (exp_dir / "oof.parquet").is_file():
        raise StackingError(f"{exp_dir / 'oof.parquet'} not found: run train.py for experiment {exp_dir.name} first")
    check_folds(exp_dir, train_slices)
    return _aligned(exp_dir / "oof.parquet", train_slices["image_id"], "train stage-one")


def _fit_pcas(cfg: PredictCfg, exp_dir: Path, train_slices: pd.DataFrame, probs: np.ndarray, rows: np.ndarray,
              n_oof: int, test_slices: pd.DataFrame | None) -> tuple[np.ndarray, dict]:
    """One experiment's PCA per fold model on its own OOF rows (load_stage_one's docstring) -> (the OOF
    rows' components (n, pca_width), {k: AlignedPCA})."""
    folds = train_slices["fold"].to_numpy()
    c = cfg.pca_width  # the widest reader's components (LightGBM's, or the sequence member's)
    align = test_slices is not None and cfg.pca_alignment == "procrustes"
    width = None  # each fold model's own components: ALIGN_WIDTH x c when they are aligned on test images
    pcs, models = None, {}
    for k in (int(k) for k in sorted(np.unique(folds))):
        held = np.flatnonzero(folds == k)
        emb = _embeddings(exp_dir / "oof_emb.npy", rows[held], n_oof)
        if width is None:
            width = min(ALIGN_WIDTH * c, emb.shape[1], len(held)) if align else c
            pcs = np.empty((len(train_slices), width), dtype=np.float32)
        models[k] = fit_signed_pca(emb, logit(probs[held, ANY]), width)
        pcs[held] = models[k].transform(emb)
    if align:
        common = _common_scores(exp_dir, test_slices, models)
        models, pcs = common_components(pcs, folds, models, common, logit(probs[:, ANY]), c)
    if cfg.pca_standardize:
        for k in models:
            own = pcs[folds == k]
            models[k] = standardized(models[k], own)
            pcs[folds == k] = (own - own.mean(axis=0)) / np.where(own.std(axis=0) > 1e-6, own.std(axis=0), 1.0)
    return pcs, models


def fit_test_pcas(cfg: PredictCfg, model_dir: Path, train_slices: pd.DataFrame) -> dict[tuple, object]:
    """Stage two's PCA of every (experiment, fold model k), fitted on the OOF embeddings alone, before
    stage one runs on test (cfg.keeps_test_scores): pipeline.batch.stage_one_test streams each test
    batch's embeddings through it and keeps only the scores (test_fold{k}_pcs.npy), and saves it beside
    them (ich.stage_one.TEST_PCA), which stage two then reads instead of fitting its own, so that OOF and
    test rows go through the very same map. The same fit as load_stage_one's without test slices.
    Returns {(experiment, k): AlignedPCA}."""
    if not cfg.keeps_test_scores:
        raise ValueError("fit_test_pcas: this config keeps test embeddings (no PCA, procrustes or test_embeddings)")
    out = {}
    for exp in cfg.experiments:
        d = Path(model_dir) / exp
        probs, rows, n_oof = _oof(cfg, d, train_slices)
        _, models = _fit_pcas(cfg, d, train_slices, probs, rows, n_oof, None)
        out.update({(exp, k): m for k, m in models.items()})
    return out


def _saved_test_pca(cfg: PredictCfg, exp_dir: Path) -> dict | None:
    """{k: AlignedPCA} that stage one's kept test scores of this experiment came through, when they match
    this config's PCA (test_pca_spec) and every fold model's scores are there; else None."""
    import joblib

    path = exp_dir / files.TEST_PCA
    if not cfg.pca_width or not path.is_file():
        return None
    saved = joblib.load(path)
    models = saved.get("models", {}) if saved.get("spec") == test_pca_spec(cfg) else {}
    if not models or not all(files.fold_test_scores(exp_dir, k).is_file() for k in models):
        return None
    return models


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
    slices and `pca_alignment: procrustes`, the K PCAs (of ALIGN_WIDTH x
    pca_width dimensions) of an experiment are then rotated into one frame
    on the test images, which every fold model has scored (unlabeled, so no
    label reaches stage two through it), and one PCA of the aligned OOF rows
    picks the components every fold model shares (`common_components`).
    With `sign` (the default) each fold model keeps its own components,
    signs fixed, and the fit needs no test image: stage one on test fitted
    them already and kept only the test scores (test_fold{k}_pcs.npy, with
    the PCAs in test_pca.joblib: `fit_test_pcas`); stage two then uses those
    PCAs for the OOF rows too and reads the scores, else fits its own and
    reads the test embeddings (test_fold{k}_emb.npy).
    Returns (train view, {k: test view of fold model k}) (None without test_slices).
    """
    fold_ids = [int(k) for k in sorted(np.unique(train_slices["fold"]))]
    folds = train_slices["fold"].to_numpy()
    train = StageOne({})
    for exp in cfg.experiments:
        d = model_dir / exp
        train.probs[exp], rows, n_oof = _oof(cfg, d, train_slices)
        if not cfg.pca_width:
            continue
        saved = _saved_test_pca(cfg, d) if test_slices is not None else None
        if saved is not None and sorted(saved) == fold_ids:
            models, pcs = saved, np.empty((len(train_slices), cfg.pca_width), np.float32)
            for k in fold_ids:
                held = np.flatnonzero(folds == k)
                pcs[held] = models[k].transform(_embeddings(d / "oof_emb.npy", rows[held], n_oof))
        else:
            pcs, models = _fit_pcas(cfg, d, train_slices, train.probs[exp], rows, n_oof, test_slices)
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
    with its embeddings through that model's own PCA (`pca_models[(experiment, k)]`, as `view_of`);
    where stage one kept only the scores of that PCA (`_saved_test_pca`), those scores."""
    view = StageOne({})
    for exp in cfg.experiments:
        d = model_dir / exp
        view.probs[exp], rows, n = _aligned(_test_fold_path(d, k), slices["image_id"], f"fold {k} test stage-one")
        if not cfg.pca_width:
            continue
        if _saved_test_pca(cfg, d) is not None:
            view.pcs[exp] = _embeddings(files.fold_test_scores(d, k), rows, n)
        else:
            view.pcs[exp] = pca_models[exp, k].transform(_embeddings(_test_fold_path(d, k, emb=True), rows, n))
    return view


def view_of(cfg: PredictCfg, outputs: dict, k: int, pca_models: dict) -> StageOne:
    """Fold model k's outputs on some rows ({experiment: (probabilities, embeddings or None)}, rows
    aligned) -> the view stage two reads: the probabilities, and the embeddings through that fold model's
    own aligned PCA: the in-memory engine's (pipeline.engine) view, as fold_model_view's from files."""
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
