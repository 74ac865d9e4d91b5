import numpy as np
import pytest
from sklearn.metrics import log_loss

from ich.metric import per_label_log_loss, prior_baseline, weighted_log_loss


def test_hand_computed_value():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    p = np.full((2, 6), 0.5)
    assert weighted_log_loss(y, p) == pytest.approx(np.log(2))
    p = np.array([[0.9, 0.5, 0.5, 0.5, 0.5, 0.8], [0.5, 0.5, 0.5, 0.5, 0.5, 0.2]])
    # per label: epidural -(ln .9 + ln .5)/2, four labels ln 2, any -(ln .8 + ln .8)/2
    epi = -(np.log(0.9) + np.log(0.5)) / 2
    any_ = -np.log(0.8)
    expected = (epi + 4 * np.log(2) + 2 * any_) / 7
    assert weighted_log_loss(y, p) == pytest.approx(expected)


def test_matches_sklearn_per_column():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 6)) < 0.2).astype(int)
    p = rng.random((500, 6))
    ours = per_label_log_loss(y, p)
    ref = np.array([log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(6)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert weighted_log_loss(y, p) == pytest.approx(np.average(ref, weights=[1, 1, 1, 1, 1, 2]))


def test_clipping_keeps_loss_finite():
    y = np.array([[1, 1, 1, 1, 1, 1]])
    p = np.zeros((1, 6))
    assert weighted_log_loss(y, p) == pytest.approx(-np.log(1e-15))


def test_prior_baseline_and_errors():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(prior_baseline(y, 3), np.tile([0.5, 0, 0, 0, 0, 0.5], (3, 1)))
    with pytest.raises(ValueError):
        weighted_log_loss(y, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        weighted_log_loss(y, np.full((2, 6), np.nan))


def test_log_loss_table_prior_is_out_of_fold():
    from ich.metric import log_loss_table
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=float)
    folds = np.array([0, 0, 1, 1])
    p = np.full(y.shape, 0.3)
    table = log_loss_table(y, folds, {"flat": p})
    assert list(table.index) == ["prior baseline", "flat"]
    assert table.loc["flat", "weighted"] == pytest.approx(weighted_log_loss(y, p))
    # fold 0's prior comes from fold 1's rows only (and vice versa)
    prior = np.vstack([prior_baseline(y[2:], 2), prior_baseline(y[:2], 2)])
    assert table.loc["prior baseline", "weighted"] == pytest.approx(weighted_log_loss(y, prior))
    assert table.loc["flat", "any"] == pytest.approx(-np.log(0.3) / 2 - np.log(0.7) / 2)
