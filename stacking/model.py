"""One LightGBM per label on the stage-one folds: OOF and fold-averaged test predictions.

The features are binned once into a LightGBM Dataset; each fold takes a
subset of it (the bins are shared), and each label only swaps the labels of
that subset. That keeps 6 labels x K folds of boosting within minutes at the
full competition scale (see benchmarks/stacking.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
from tqdm.auto import tqdm

from ich.labels import LABELS


@dataclass
class StackResult:
    oof: np.ndarray                      # (n_train, 6)
    test: np.ndarray | None              # (n_test, 6), mean over folds
    boosters: dict = field(default_factory=dict)   # (label, fold) -> lgb.Booster
    importance: np.ndarray | None = None  # (n_features,) total gain over all boosters


def fit_predict(X: np.ndarray, y: np.ndarray, folds: np.ndarray, X_test: np.ndarray | None, *,
                params: dict, feature_names: list[str], num_boost_round: int = 2000,
                early_stopping_rounds: int = 50, progress: bool = True) -> StackResult:
    fold_ids = sorted(np.unique(folds))
    oof = np.full(y.shape, np.nan, dtype=np.float64)
    test = np.zeros((len(X_test), len(LABELS))) if X_test is not None else None
    importance = np.zeros(X.shape[1])
    full = lgb.Dataset(X, label=y[:, 0], feature_name=feature_names, free_raw_data=False,
                       params={"max_bin": params.get("max_bin", 255), "verbose": -1}).construct()
    result = StackResult(oof=oof, test=test)
    bar = tqdm(total=len(fold_ids) * len(LABELS), desc="stage two", unit="booster", disable=not progress)
    for k in fold_ids:
        train_idx, valid_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        dtrain = full.subset(train_idx).construct()
        dvalid = full.subset(valid_idx).construct()
        for j, label in enumerate(LABELS):
            dtrain.set_label(y[train_idx, j])
            dvalid.set_label(y[valid_idx, j])
            booster = lgb.train({**params, "metric": "binary_logloss"}, dtrain, num_boost_round=num_boost_round,
                                valid_sets=[dvalid], valid_names=["valid"],
                                callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)])
            best = booster.best_iteration or booster.current_iteration()
            oof[valid_idx, j] = booster.predict(X[valid_idx], num_iteration=best)
            if X_test is not None:
                test[:, j] += booster.predict(X_test, num_iteration=best) / len(fold_ids)
            importance += booster.feature_importance("gain", iteration=best)
            result.boosters[(label, int(k))] = booster
            bar.update(1)
    bar.close()
    result.importance = importance
    return result
