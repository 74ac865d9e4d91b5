"""Stage two end to end: stage-one outputs, features, the members, their blend, outputs.

The pieces live by concern: stacking.stage_one reads stage one's outputs
(one view per stage-one fold model), stacking.pca gives their embeddings
components every fold model shares, stacking.features builds the inputs,
stacking.model (LightGBM) and stacking.sequence are the members,
stacking.blend blends them, stacking.saved writes what stacking.apply reads,
stacking.tables / stacking.plots report. This module runs them in order.

Writes to MODEL_CHECKPOINT_DIR/stacking/<name>/: oof.parquet, test.parquet and
the saved stage two (stacking.saved); to LOGS_DIR/stacking/<name>/:
metrics.csv (the log-loss table, TABLE_NOTE says what each stage-two row is),
blend_weights.csv, rounds.csv (rounds per label and fold, honest and
optimistic), feature_importance.png, and with the sequence member
sequence_epochs.csv, sequence_curves.csv (training and validation loss per
fold and epoch) and sequence_curves.png.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ich.cache import write_atomic
from ich.labels import LABELS
from ich.metric import log_loss_table

from . import blend
from .config import PredictCfg
from .features import build_features, series_inputs
from .model import fit_predict
from .plots import curves_plot, importance_plot
from .saved import write_saved
from .stage_one import StackingError, StageOne, load_stage_one, mean_probs
from .tables import (STAGE_TWO, STAGE_TWO_OPTIMISTIC, TABLE_NOTE, curves_table, format_table, frame,  # noqa: F401
                     member_rows)

REFERENCE = "lightgbm"  # the member the blend shrinks towards (stacking.blend)


@dataclass
class Features:
    """The members' inputs: OOF rows, and test rows once per stage-one fold model k.

    X / X_test are the boosters' neighbour features; `train` / `tests` the
    stage-one views they were built from, which the sequence member reads
    directly (it sees the neighbours itself). X_test[k] is a function that
    builds fold model k's test features when called: stacking.model.fit_predict
    calls each once the boosters are trained and their binned data freed, so
    the 5 test matrices (0.84 GB at the competition's size with 345 features)
    are never held together, nor under the boosting (`test_matrix` builds one).
    """
    X: np.ndarray
    names: list[str]
    probs: dict[str, np.ndarray]                # experiment -> its OOF probabilities
    base: np.ndarray | None                     # mean stage-one OOF probability (start_from_stage_one)
    X_test: dict | None = None                   # k -> () -> test features from fold model k
    base_test: dict[int, np.ndarray] | None = None  # k -> mean over experiments of fold model k's probabilities
    pca_models: dict = field(default_factory=dict)  # (experiment, fold k) -> AlignedPCA (saved with the boosters)
    train: StageOne | None = None                # the OOF view
    tests: dict[int, StageOne] | None = None     # k -> fold model k's test view

    def drop_boosting_inputs(self) -> None:
        """Free X and X_test once the boosters are trained: nothing after LightGBM reads them (the
        sequence member reads the views), and they are the largest arrays of stage two (1.9 GB at the
        competition's size with 345 features), which would otherwise sit under the member's own peak."""
        self.X, self.X_test = None, None

    def test_matrix(self, k: int) -> np.ndarray:
        """Fold model k's test features (built now)."""
        return self.X_test[k]()


def stage_two_features(cfg: PredictCfg, model_dir: Path, train_slices: pd.DataFrame,
                       test_slices: pd.DataFrame | None = None) -> Features:
    """Load stage one (`load_stage_one`) and build the features of the OOF rows and of each test pairing.

    Booster k is trained on folds != k and scored on fold k, whose features
    came from stage-one fold model k; fit_predict applies it to the test
    features of the same fold model k and averages over k (ARCHITECTURE.md,
    contract 3), so each test component is the very function that produced
    an OOF fold, on inputs from the same distribution.
    """
    train, tests = load_stage_one(cfg, model_dir, train_slices, test_slices)

    def build(slices, view):
        return build_features(slices, view.probs, k=cfg.k_neighbors,
                              embeddings=view.first_pcs(cfg.pca_components) or None, neighbors=cfg.neighbors)

    X, names = build(train_slices, train)
    out = Features(X, names, train.probs, mean_probs(train) if cfg.start_from_stage_one else None,
                   pca_models=train.pca_models, train=train, tests=tests)
    if tests is not None:
        def test_features(view, rows=None):
            X_test, test_names = build(test_slices if rows is None else test_slices.iloc[:rows], view)
            if test_names != names:
                raise StackingError("train and test slices.parquet give different features ("
                                    + ", ".join(sorted(set(names) ^ set(test_names))[:5])
                                    + "): prepare both splits with the same prepare_data.py")
            return X_test

        first = next(iter(tests.values()))  # the names checked now, on one row, not after the boosting
        test_features(StageOne({e: p[:1] for e, p in first.probs.items()}, {e: p[:1] for e, p in first.pcs.items()}), 1)
        out.X_test = {k: (lambda v=view: test_features(v)) for k, view in tests.items()}
        out.base_test = {k: mean_probs(view) for k, view in tests.items()} if cfg.start_from_stage_one else None
    return out


@dataclass
class Member:
    """What one stage-two member gives: honest OOF, test (mean over fold pairings), optimistic OOF, the
    predictions the nested blend fits fold k's weights on (stacking.blend.cross_fit), the member's own
    result (boosters or networks, curves) and its wall seconds."""
    oof: np.ndarray
    test: np.ndarray | None
    oof_optimistic: np.ndarray
    nested: np.ndarray | None
    result: object
    seconds: float


def fit_members(cfg: PredictCfg, feats: Features, train_slices: pd.DataFrame, test_slices: pd.DataFrame | None,
                y: np.ndarray, folds: np.ndarray, progress: bool = True) -> dict[str, Member]:
    """The configured members on the same stage-one views, in config order (LightGBM:
    `stacking.model.fit_predict`, the sequence model: `stacking.sequence.fit_predict`). LightGBM's
    feature matrices are dropped from `feats` once it is trained (`Features.drop_boosting_inputs`)."""
    members = {}
    for name in cfg.members:
        t0 = time.perf_counter()
        if name == "lightgbm":
            res = fit_predict(feats.X, y, folds, feats.X_test, params=cfg.lgb_params, feature_names=feats.names,
                              num_boost_round=cfg.num_boost_round, early_stopping_rounds=cfg.early_stopping_rounds,
                              progress=progress, base=feats.base, base_test=feats.base_test)
            feats.drop_boosting_inputs()
        else:
            from . import sequence  # torch: only with the sequence member (tests/test_layout.py)
            inputs = lambda slices, view: series_inputs(  # noqa: E731
                slices, view.probs, view.first_pcs(cfg.sequence_pca_components))
            tests = None if feats.tests is None else {
                k: (test_slices, inputs(test_slices, view), feats.base_test[k] if feats.base_test else None)
                for k, view in feats.tests.items()}
            res = sequence.fit_predict(train_slices, inputs(train_slices, feats.train), y, folds, feats.base, tests,
                                       cfg.sequence_params, progress=progress)
        members[name] = Member(res.oof, res.test, res.oof_optimistic, res.nested, res, time.perf_counter() - t0)
    return members


def blend_members(y: np.ndarray, folds: np.ndarray, members: dict[str, Member]) -> tuple[np.ndarray, np.ndarray]:
    """(blend weights (n_members, 6) fitted on all folds, for test; the nested, cross-fitted OOF blend),
    both shrunk towards LightGBM where the other members do not clearly help (stacking.blend)."""
    oof = {name: m.oof for name, m in members.items()}
    reference = REFERENCE if REFERENCE in members else None
    weights = blend.fit_weights(y, oof, folds, reference)
    oof_blend, _ = blend.cross_fit(y, folds, oof, {n: m.nested for n, m in members.items()}, reference)
    return weights, oof_blend


def run_stacking(cfg: PredictCfg, *, train_slices: pd.DataFrame, test_slices: pd.DataFrame | None,
                 model_dir: Path, logs_dir: Path, progress: bool = True, log=print) -> dict:
    """Features (`stage_two_features`), the members (`fit_members`), their per-label blend
    (`blend_members`), outputs (module docstring).

    Every stage-two row of the metrics table is honest (TABLE_NOTE): each
    member's rounds or epochs picked on the other folds, the blend's weights
    fitted on the other folds with members picked without them too; the
    optimistic rows beside them are the same models scored the old way, for
    comparison only.
    """
    feats = stage_two_features(cfg, model_dir, train_slices, test_slices)
    y = train_slices[list(LABELS)].to_numpy(np.float64)
    folds = train_slices["fold"].to_numpy()
    log(f"stage two: {feats.X.shape[0]} train rows x {len(feats.names)} features from {', '.join(cfg.experiments)}"
        + (f"; {len(test_slices)} test rows x {len(feats.X_test)} stage-one fold models" if test_slices is not None
           else "") + f"; members: {', '.join(cfg.members)}")
    members = fit_members(cfg, feats, train_slices, test_slices, y, folds, progress)
    weights, oof_blend = blend_members(y, folds, members)
    res = members["lightgbm"].result if "lightgbm" in members else None
    seq = members["sequence"].result if "sequence" in members else None

    out_dir, log_dir = model_dir / "stacking" / cfg.name, logs_dir / "stacking" / cfg.name
    log_dir.mkdir(parents=True, exist_ok=True)
    write_saved(out_dir, cfg, feature_names=feats.names, folds=sorted(int(k) for k in np.unique(folds)),
                pca=feats.pca_models, members=list(members), blend_weights=weights, lightgbm=res, sequence=seq)
    oof = frame(train_slices, oof_blend)
    write_atomic(out_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    result = {"out_dir": out_dir, "oof": oof, "blend_weights": pd.DataFrame(weights, index=list(members),
                                                                            columns=list(LABELS))}
    if test_slices is not None:
        test = frame(test_slices, blend.apply(weights, {n: m.test for n, m in members.items()}))
        write_atomic(out_dir / "test.parquet", lambda p: test.to_parquet(p, index=False))
        result["test"] = test
        result["member_tests"] = {name: frame(test_slices, m.test) for name, m in members.items()}

    rows = dict(feats.probs)
    if len(feats.probs) > 1:
        rows["mean of stage one"] = np.mean(list(feats.probs.values()), axis=0)
    rows.update(member_rows(members, oof_blend))
    table = log_loss_table(y, folds, rows)
    table.to_csv(log_dir / "metrics.csv")
    result.update(metrics=table)
    result["blend_weights"].to_csv(log_dir / "blend_weights.csv")
    if res is not None:
        rounds = pd.DataFrame([(label, k, n, res.rounds_optimistic[label, k]) for (label, k), n in res.rounds.items()],
                              columns=["label", "fold", "rounds", "rounds_optimistic"])
        rounds.to_csv(log_dir / "rounds.csv", index=False)
        result["rounds"] = rounds
        result["importance_plot"] = importance_plot(feats.names, res.importance, log_dir / "feature_importance.png")
    if seq is not None:
        epochs = pd.DataFrame([(k, n, seq.epochs_optimistic[k]) for k, n in seq.epochs.items()],
                              columns=["fold", "epochs", "epochs_optimistic"])
        epochs.to_csv(log_dir / "sequence_epochs.csv", index=False)
        result["sequence_epochs"] = epochs
        curves_table(seq.curves, seq.train_curves).to_csv(log_dir / "sequence_curves.csv", index=False)
        result["sequence_curves_plot"] = curves_plot(seq.curves, log_dir / "sequence_curves.png", seq.train_curves)
    weights_text = "\n".join(f"  {label:17s} " + ", ".join(f"{name} {weights[i, j]:.2f}"
                                                            for i, name in enumerate(members))
                             for j, label in enumerate(LABELS))
    log("out-of-fold weighted log loss (lower is better):\n" + format_table(table) + "\n" + TABLE_NOTE
        + (f"\nblend weights per label (fitted on all folds, applied to test; LightGBM alone where the "
           f"others do not clearly help):\n{weights_text}" if len(members) > 1 else ""))
    return result
