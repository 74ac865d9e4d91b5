"""One LightGBM per label on the stage-one folds: honest OOF and fold-paired test predictions.

Number of rounds, honestly. Early stopping on the fold a booster is then
scored on picks the round that happens to suit that fold's labels: its OOF
score is optimistic, most where the features are weakest. Nested CV would
fix it at K-1 times the training. Instead the K boosters of a label train in
lockstep, one round at a time, each recording its validation curve on its
held-out fold; booster k (trained on the folds != k) stops at

    n_k = argmin over t of mean_{j != k} curve_j(t)

(the leave-one-out mean curve), with early stopping applied to that mean
curve, and OOF(fold k) = booster k truncated at n_k. Neither its trees nor
n_k are chosen by how it does on fold k: that fold's curve never enters
(`pick_rounds`). Training goes on until every k's mean curve has stopped
improving for `early_stopping_rounds` rounds (or `num_boost_round`). The old
protocol (each fold truncated where its own curve is best) is still computed,
from the same boosters, for comparison only (`oof_optimistic`).

Rounds for the blend, honest to the second order. Stage two's blend
(stacking.blend) fits fold k's weights on the other folds' predictions. Those
must not have been shaped by fold k either: booster j's rounds for that use
are picked on the mean curve of the folds other than j *and* k
(`pick_pairs`), and `nested[k]` holds those predictions on the rows of every
fold j != k. So fold k's blend weights, like its OOF, never see a curve
computed on fold k's labels. Training runs until those pair picks have
stopped too (K >= 3; with 2 folds there is nothing left to average).

Test. Booster k is applied to the test features built from stage-one fold
model k (`X_test[k]`), which is how fold k's OOF features were made, and the
test prediction is the mean over k: each component is exactly the function
that produced an OOF fold (stacking.run explains the features).

Speed. The features are binned once into a LightGBM Dataset; each fold takes
a subset of it (the bins are shared), and each label only swaps the labels of
those subsets. Histograms are built column-wise (`force_col_wise`) unless the
params choose: with feature_fraction < 1 LightGBM then skips the unused
columns, which measured 1.5x faster per iteration than its automatic choice
(row-wise) on the full-scale table of benchmarks/stacking.py; the trees are
the same. A fold's held-out rows are copied out of X when its boosters
predict them, per label: 30 copies cost seconds at the competition's size,
where keeping one per fold would hold a second X (1 GB) through the boosting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
from tqdm.auto import tqdm

from ich.labels import LABELS

# LightGBM Dataset parameters: fixed once the features are binned
BINNING = ("max_bin", "max_bin_by_feature", "min_data_in_bin", "bin_construct_sample_cnt", "data_random_seed",
           "use_missing", "zero_as_missing", "feature_pre_filter", "min_data_in_leaf")  # pre-filter uses it


@dataclass
class StackResult:
    oof: np.ndarray                      # (n_train, 6), honest: rounds picked on the other folds
    test: np.ndarray | None              # (n_test, 6), mean over k of booster k on fold model k's features
    oof_optimistic: np.ndarray | None = None  # (n_train, 6), rounds picked on the scored fold (comparison only)
    boosters: dict = field(default_factory=dict)   # (label, fold) -> lgb.Booster holding its n_k trees
    rounds: dict = field(default_factory=dict)     # (label, fold) -> n_k (honest)
    rounds_optimistic: dict = field(default_factory=dict)  # (label, fold) -> best round on its own fold
    curves: dict = field(default_factory=dict)     # label -> (K, rounds trained) validation log loss
    nested: np.ndarray | None = None  # (K, n_train, 6): [i] = folds != i at rounds picked without fold i too
    importance: np.ndarray | None = None  # (n_features,) total gain over all boosters, at n_k


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def early_stop(select: np.ndarray, patience: int) -> tuple[np.ndarray, np.ndarray]:
    """LightGBM's early stopping replayed on each row of `select` (K, T): a loss per round.

    Returns (rounds, stopped): for each row, the number of rounds at its
    best value (strictly better than all before) up to the first round that
    came `patience` rounds after the best, and whether that round is within T.
    """
    K, T = select.shape
    t = np.arange(T)
    new_best = np.ones((K, T), dtype=bool)
    new_best[:, 1:] = select[:, 1:] < np.minimum.accumulate(select, axis=1)[:, :-1]
    best_t = np.maximum.accumulate(np.where(new_best, t, 0), axis=1)   # best round so far
    stall = (t - best_t) >= patience
    stopped = stall.any(axis=1)
    stop_t = np.where(stopped, stall.argmax(axis=1), T - 1)
    return best_t[np.arange(K), stop_t] + 1, stopped


def pick_rounds(curves: np.ndarray, patience: int) -> tuple[np.ndarray, np.ndarray]:
    """Honest rounds per fold from the validation curves (K, T) of the K boosters of one label.

    n_k: early stopping on the mean over folds j != k of curve_j, so that
    curve_k (how booster k does on the fold it will be scored on) never
    enters; returns (n, stopped) as `early_stop`.
    """
    K = len(curves)
    if K < 2:
        raise ValueError("honest rounds need at least two folds")
    loo = (curves.sum(axis=0, keepdims=True) - curves) / (K - 1)
    return early_stop(loo, patience)


def pick_pairs(curves: np.ndarray, patience: int) -> tuple[np.ndarray, np.ndarray]:
    """Rounds (K, K) for the nested blend: [j, k] = early stopping on the mean curve of the folds other
    than j and k (j != k), [j, j] = the honest rounds (`pick_rounds`); and whether each has stopped.

    Booster j at rounds [j, k] predicts fold j for the blend weights of fold
    k: neither fold j's nor fold k's curve chose it (module docstring).
    """
    K = len(curves)
    honest, stopped = pick_rounds(curves, patience)
    rounds, done = np.diag(honest), np.diag(stopped)
    if K < 3:
        return rounds, done | ~np.eye(K, dtype=bool)
    total = curves.sum(axis=0)
    j, k = np.nonzero(~np.eye(K, dtype=bool))
    pairs = (total[None, :] - curves[j] - curves[k]) / (K - 2)
    rounds[j, k], done[j, k] = early_stop(pairs, patience)
    return rounds, done


def fit_predict(X: np.ndarray, y: np.ndarray, folds: np.ndarray, X_test: dict[int, np.ndarray] | None, *,
                params: dict, feature_names: list[str], num_boost_round: int = 2000,
                early_stopping_rounds: int = 50, progress: bool = True,
                base: np.ndarray | None = None, base_test: dict[int, np.ndarray] | None = None,
                y_valid: np.ndarray | None = None) -> StackResult:
    """Boost one model per (label, fold); rounds picked honestly (module docstring).

    X_test: fold k -> the test features built from stage-one fold model k
    (one entry per fold in `folds`; an array, or a function that builds it,
    called once after the boosting and the binned data are done with), or
    None for no test predictions.
    base / base_test[k] (optional, (n, 6) probabilities, e.g. the mean over
    experiments of stage-one probabilities, for test those of fold model k):
    boosting starts from logit(base) instead of from a constant (LightGBM's
    init_score), so each tree learns a correction to stage one. This keeps
    stage two from falling below stage one on small data, and converges in
    fewer rounds. The boosters then predict that correction: add logit(base)
    to their raw score.
    y_valid: the labels that score each held-out fold (its validation curve); y by default. Only a test
    of honesty sets it: fold k's scoring labels may change without changing what the others train on.
    """
    y_valid = y if y_valid is None else y_valid
    fold_ids = [int(k) for k in sorted(np.unique(folds))]
    if X_test is not None and sorted(X_test) != fold_ids:
        raise ValueError(f"X_test needs the test features of each fold model {fold_ids}, got {sorted(X_test)}")
    if base is not None and X_test is not None and (base_test is None or sorted(base_test) != fold_ids):
        raise ValueError("with base, base_test needs the stage-one test probabilities of each fold model")
    init = logit(base) if base is not None else None
    params = {**params, "metric": "binary_logloss"}
    if not any(params.get(key) for key in ("force_col_wise", "force_row_wise")):
        params["force_col_wise"] = True  # same trees, faster here (module docstring)
    # binned once for all folds and labels, with the binning settings training checks against
    binning = {key: params[key] for key in BINNING if key in params}
    # free_raw_data: the Dataset drops its reference to X once binned. With False, each fold's subset
    # copied its rows of X as well as their bins (lightgbm's Dataset.subset -> get_data), 4x the binned
    # bytes: at full scale the 10 fold datasets took 6.5 GB instead of about 1.3 (BENCHMARKS.md, "Stage
    # two's cost at full scale"). Same trees either way; X itself is still the caller's.
    full = lgb.Dataset(X, label=y[:, 0], feature_name=feature_names, free_raw_data=True,
                       params={"max_bin": 255, **binning, "verbose": -1}).construct()
    held = {k: np.flatnonzero(folds == k) for k in fold_ids}
    dtrain = {k: full.subset(np.flatnonzero(folds != k)).construct() for k in fold_ids}
    dvalid = {k: full.subset(held[k]).construct() for k in fold_ids}

    result = StackResult(oof=np.full(y.shape, np.nan), oof_optimistic=np.full(y.shape, np.nan), test=None)
    result.importance = np.zeros(X.shape[1])
    result.nested = np.full((len(fold_ids),) + y.shape, np.nan, dtype=np.float32)
    bar = tqdm(total=len(fold_ids) * len(LABELS), desc="stage two", unit="booster", disable=not progress)
    for j, label in enumerate(LABELS):
        for k in fold_ids:
            dtrain[k].set_label(y[folds != k, j])
            dvalid[k].set_label(y_valid[held[k], j])
            if init is not None:
                dtrain[k].set_init_score(init[folds != k, j])
                dvalid[k].set_init_score(init[held[k], j])
        boosters, curves = _train_lockstep(params, dtrain, dvalid, num_boost_round, early_stopping_rounds)
        pairs, _ = pick_pairs(curves, early_stopping_rounds)
        optimistic, _ = early_stop(curves, early_stopping_rounds)
        result.curves[label] = curves
        for i, k in enumerate(fold_ids):
            b, n, n_opt = boosters[k], int(pairs[i, i]), int(optimistic[i])
            rows_init = None if init is None else init[held[k], j]
            at = predict_rounds(b, X[held[k]], {n, n_opt, *pairs[i].tolist()}, rows_init)
            result.oof[held[k], j], result.oof_optimistic[held[k], j] = at[n], at[n_opt]
            for other in range(len(fold_ids)):
                if other != i:
                    result.nested[other, held[k], j] = at[int(pairs[i, other])]
            result.importance += b.feature_importance("gain", iteration=n)
            # keep the n_k trees only, detached from the training data (as lgb.train returns its boosters)
            result.boosters[(label, k)] = lgb.Booster(model_str=b.model_to_string(num_iteration=n))
            result.rounds[(label, k)], result.rounds_optimistic[(label, k)] = n, n_opt
            bar.update(1)
        del boosters
    bar.close()
    del full, dtrain, dvalid  # the binned data, before the test features are built
    for k in fold_ids if X_test is not None else ():  # booster k (its n_k trees) on fold model k's features
        X_k = X_test[k]() if callable(X_test[k]) else X_test[k]
        if result.test is None:
            result.test = np.zeros((len(X_k), len(LABELS)))
        for j, label in enumerate(LABELS):
            test_init = None if init is None else logit(base_test[k][:, j])
            result.test[:, j] += predict_booster(result.boosters[label, k], X_k, None, test_init) / len(fold_ids)
        del X_k
    return result


def _train_lockstep(params: dict, dtrain: dict, dvalid: dict, num_boost_round: int,
                    patience: int) -> tuple[dict, np.ndarray]:
    """The K boosters of one label, one round each at a time, until every fold's honest rounds and the
    nested blend's (`pick_pairs`) are fixed.

    Returns the boosters and their validation curves (K, rounds trained):
    curves[i, t] = booster i's log loss on its held-out fold after t + 1 rounds.
    """
    boosters = {}
    for k in dtrain:
        boosters[k] = lgb.Booster(params=params, train_set=dtrain[k])
        boosters[k].add_valid(dvalid[k], "valid")
    curves = np.empty((len(dtrain), num_boost_round))
    for t in range(num_boost_round):
        for i, b in enumerate(boosters.values()):
            b.update()
            curves[i, t] = b.eval_valid()[0][2]
        if pick_pairs(curves[:, :t + 1], patience)[1].all():
            return boosters, curves[:, :t + 1]
    return boosters, curves


def predict_booster(booster: lgb.Booster, X: np.ndarray, iteration: int | None, init: np.ndarray | None) -> np.ndarray:
    """Probabilities of one booster; with init (a logit), the booster's raw score is a correction to it."""
    if init is None:
        return booster.predict(X, num_iteration=iteration)
    raw = booster.predict(X, num_iteration=iteration, raw_score=True)
    return 1 / (1 + np.exp(-(raw + init)))


def predict_rounds(booster: lgb.Booster, X: np.ndarray, rounds, init: np.ndarray | None,
                   chunk: int = 50) -> dict[int, np.ndarray]:
    """Probabilities of one booster after each of several numbers of rounds, for about the price of one
    prediction at the largest: raw scores summed over blocks of `chunk` trees, shared between the
    numbers, plus each number's remainder. The result for n depends on n alone (the same sums in the
    same order whatever else is asked), so honesty tests can compare runs bit for bit."""
    out, prefix, done = {}, np.zeros(len(X)), 0
    for n in sorted({int(r) for r in rounds}):
        while done + chunk <= n:
            prefix = prefix + booster.predict(X, start_iteration=done, num_iteration=chunk, raw_score=True)
            done += chunk
        raw = prefix if n == done else prefix + booster.predict(X, start_iteration=done, num_iteration=n - done,
                                                                  raw_score=True)
        out[n] = 1 / (1 + np.exp(-(raw + (0 if init is None else init))))
    return out
