"""Stage two's blend is honest to the second order, and shrinks towards LightGBM without a clear gain.

Fold k's blend weights are fitted on the other folds' member predictions;
those predictions' rounds (LightGBM) and epochs (sequence member) must have
been picked with fold k left out too, or fold k's labels reach its own
weights through the members' validation curves (measured before: inverting
one fold's validation labels moved that fold's blended OOF by up to 0.08).
"""
import numpy as np
import pytest
import torch

from ich.labels import LABELS
from stacking import blend, sequence
from stacking.features import build_features
from stacking.model import early_stop, fit_predict, pick_pairs, pick_rounds
from test_stacking_honest import PARAMS
from test_stacking_sequence import FAST, series_problem


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_pair_rounds_see_neither_fold():
    rng = np.random.default_rng(0)
    t = np.arange(200)
    curves = 0.5 - 0.1 * (1 - np.exp(-t / 30)) + 0.0004 * t + rng.normal(0, 0.002, (5, 200))
    pairs, stopped = pick_pairs(curves, 15)
    assert stopped.all()
    np.testing.assert_array_equal(np.diag(pairs), pick_rounds(curves, 15)[0])
    assert pairs[1, 3] == early_stop(curves[[0, 2, 4]].mean(axis=0, keepdims=True), 15)[0][0]
    other = curves.copy()
    other[3] = np.where(t < 4, curves[3], curves[3] + 1.0)  # fold 3's labels say: stop at round 4
    moved = pick_pairs(other, 15)[0]
    np.testing.assert_array_equal(moved[:, 3], pairs[:, 3])  # fold 3's blend inputs: unchanged
    assert (moved[[0, 1, 2, 4]][:, [0, 1, 2, 4]] != pairs[[0, 1, 2, 4]][:, [0, 1, 2, 4]]).any()


SMALL = {**FAST, "hidden": 8, "epochs": 8, "patience": 2}


def members(slices, X_seq, p, y, folds, y_valid):
    X, names = build_features(slices, {"e": p}, k=2)
    lgb = fit_predict(X, y, folds, None, params=PARAMS, feature_names=names, num_boost_round=40,
                      early_stopping_rounds=5, progress=False, base=p, y_valid=y_valid)
    seq = sequence.fit_predict(slices, X_seq, y, folds, p, None, SMALL, progress=False, y_valid=y_valid)
    return {"lightgbm": lgb, "sequence": seq}


def test_fold_k_validation_labels_move_nothing_of_fold_k_in_the_blend():
    """Fold 0's labels inverted where they score fold 0 (its validation curves and the blend's fit):
    fold 0's blend weights and blended OOF stay, with and without shrinkage; the first-order cross-fit
    (weights fitted on the honest OOF, whose rounds saw fold 0's curve) moves."""
    slices, X, p, y, folds = series_problem(n_series=60, seed=4)
    inverted = y.copy()
    inverted[folds == 0] = 1 - inverted[folds == 0]
    before, after = members(slices, X, p, y, folds, None), members(slices, X, p, y, folds, inverted)
    held = folds == 0
    for name in before:  # the members' own honest OOF of fold 0 stays as well
        np.testing.assert_array_equal(after[name].oof[held], before[name].oof[held])
        np.testing.assert_array_equal(after[name].nested[0], before[name].nested[0])
    oof = lambda m: {n: r.oof for n, r in m.items()}  # noqa: E731
    nested = lambda m: {n: r.nested for n, r in m.items()}  # noqa: E731
    for reference in (None, "lightgbm"):
        out_b, used_b = blend.cross_fit(y, folds, oof(before), nested(before), reference)
        out_a, used_a = blend.cross_fit(inverted, folds, oof(after), nested(after), reference)
        np.testing.assert_array_equal(used_a[0], used_b[0])
        np.testing.assert_array_equal(out_a[held], out_b[held])
    first_b, w_b = blend.cross_fit(y, folds, oof(before))
    first_a, w_a = blend.cross_fit(inverted, folds, oof(after))
    assert not np.array_equal(first_a[held], first_b[held])  # what the nested blend fixes


def test_shrinkage_keeps_the_reference_without_a_clear_gain():
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(5), 2000)
    y = (rng.random((10_000, 6)) < 0.2).astype(float)
    signal = np.where(y == 1, 0.6, 0.15)
    ref = np.clip(signal + rng.normal(0, 0.1, y.shape), 0.01, 0.99)
    twin = np.clip(signal + rng.normal(0, 0.1, y.shape), 0.01, 0.99)  # as good, errs independently: a clear gain
    lucky = ref.copy()  # as ref, but better on one fold's rows of one label, worse on the others
    lucky[folds == 2, 0] = np.clip(signal[folds == 2, 0] + rng.normal(0, 0.02, 2000), 0.01, 0.99)
    lucky[folds != 2, 0] = np.clip(ref[folds != 2, 0] + rng.normal(0, 0.05, 8000), 0.01, 0.99)
    w = blend.fit_weights(y, {"lightgbm": ref, "twin": twin}, folds, "lightgbm")
    assert (w[1] > 0.3).all()  # averaging two independent errors helps every label on every fold
    grid = blend.fit_weights(y, {"lightgbm": ref, "lucky": lucky})
    shrunk = blend.fit_weights(y, {"lightgbm": ref, "lucky": lucky}, folds, "lightgbm")
    assert grid[1, 0] > 0  # the grid alone trusts one fold's luck
    np.testing.assert_array_equal(shrunk[:, 0], [1.0, 0.0])
    assert set(LABELS) and np.allclose(shrunk.sum(axis=0), 1)
