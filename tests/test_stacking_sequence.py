"""Stage two's sequence member and the blend: the same honest protocol as LightGBM.

- member k trains on the rows of folds != k only and is the only model that scores fold k;
- its epochs are picked on the other folds' curves, so a falsified fold-k curve moves nothing of fold k;
- at test time member k runs on stage-one fold model k's outputs;
- the blend's OOF rows of fold k are blended with weights fitted on the other folds;
- stacking.apply (what the study path and web app call) equals the batch test predictions with the blend on.
"""
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ich.config import ConfigError
from ich.labels import LABELS
from ich.metric import weighted_log_loss
from stacking import blend, sequence
from stacking.config import DEFAULT_SEQUENCE, PredictCfg, load_predict_config
from stacking.model import early_stop
from stacking.run import STAGE_TWO, run_stacking
from test_stacking_honest import PARAMS, stage_one  # noqa: F401  (a fixture)
from test_stage_two import synthetic_series

FAST = {**DEFAULT_SEQUENCE, "hidden": 16, "epochs": 12, "patience": 3, "lr": 0.01, "batch_size": 16,
        "num_threads": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def series_problem(n_series=90, seed=0):
    """Series with contiguous positive runs and a noisy stage one (stacking's test problem), as member inputs."""
    slices, p = synthetic_series(n_series, seed)
    X = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6))).astype(np.float32)
    X = np.concatenate([X, (slices["slice_index"] / (slices["n_slices"] - 1)).to_numpy(np.float32)[:, None]], 1)
    return slices, X, p, slices[list(LABELS)].to_numpy(np.float64), slices["fold"].to_numpy()


def test_member_trains_on_other_folds_only_and_beats_stage_one(monkeypatch):
    slices, X, p, y, folds = series_problem()
    made, trained_rows, scored_rows = [], {}, {}
    init, logits = sequence._Data.__init__, sequence._Data.logits

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    def spy_logits(self, net, series, which, **kw):
        out = logits(self, net, series, which, **kw)
        k = made.index(self) if self in made else -1
        rows = out[1][out[2]].numpy()
        (trained_rows if net.training else scored_rows).setdefault(k, set()).update(rows.tolist())
        return out

    monkeypatch.setattr(sequence._Data, "__init__", spy_init)
    monkeypatch.setattr(sequence._Data, "logits", spy_logits)
    res = sequence.fit_predict(slices, X, y, folds, p, None, FAST, progress=False)
    for k in range(3):
        assert trained_rows[k] == set(np.flatnonzero(folds != k).tolist())  # every row of the others, none of k
        assert scored_rows[k] == set(np.flatnonzero(folds == k).tolist())   # member k alone scores fold k
    assert np.isfinite(res.oof).all() and res.test is None
    # the neighbours carry signal: the member corrects a noisy stage one it starts from
    assert weighted_log_loss(y, res.oof) < 0.85 * weighted_log_loss(y, p)


def test_epochs_are_picked_on_the_other_folds(monkeypatch):
    """A falsified fold-k curve (it claims epoch 2 is best) moves neither member k's epochs nor its OOF."""
    slices, X, p, y, folds = series_problem(seed=1)
    before = sequence.fit_predict(slices, X, y, folds, p, None, FAST, progress=False)
    for i in range(3):  # each member stops at early stopping on the mean curve of the others
        others = np.delete(before.curves, i, axis=0).mean(axis=0, keepdims=True)
        assert before.epochs[i] == early_stop(others, FAST["patience"])[0][0]
    k, size_k = 1, int((folds == 1).sum())
    assert np.bincount(folds).tolist().count(size_k) == 1
    true_loss, calls = sequence._weighted_log_loss, {"n": 0}

    def falsified(prob, labels):
        value = true_loss(prob, labels)
        if len(labels) == size_k:
            calls["n"] += 1
            return value + (1.0 if calls["n"] > 2 else -1.0)
        return value

    monkeypatch.setattr(sequence, "_weighted_log_loss", falsified)
    after = sequence.fit_predict(slices, X, y, folds, p, None, FAST, progress=False)
    held = folds == k
    assert after.epochs[k] == before.epochs[k] and after.epochs_optimistic[k] <= 2
    np.testing.assert_array_equal(after.oof[held], before.oof[held])


def test_member_k_runs_on_fold_model_k():
    slices, X, p, y, folds = series_problem(n_series=60, seed=2)
    test = slices.iloc[:200].copy()
    rng = np.random.default_rng(0)
    tests = {k: (test, X[:200] + rng.normal(0, 1, (200, X.shape[1])).astype(np.float32), p[:200]) for k in range(3)}
    res = sequence.fit_predict(slices, X, y, folds, p, tests, FAST, progress=False)
    expect = np.mean([sequence.apply_member(res.members[k], FAST, test, tests[k][1], tests[k][2])
                      for k in range(3)], axis=0)
    np.testing.assert_allclose(res.test, expect, rtol=1e-6)
    swapped = np.mean([sequence.apply_member(res.members[k], FAST, test, tests[(k + 1) % 3][1], tests[k][2])
                       for k in range(3)], axis=0)
    assert np.abs(swapped - res.test).max() > 1e-3  # the pairing matters, so the check above means something


def test_members_trained_side_by_side_in_threads_are_the_members_trained_one_after_the_other():
    """On the CPU the K members train in up to num_threads Python threads (stacking.sequence
    `_train_side_by_side`); each member draws from its own generators, so the curves, the epochs picked,
    the weights and every prediction are those of one thread, bit for bit, whatever the threads' order."""
    slices, X, p, y, folds = series_problem(n_series=60, seed=3)
    test = slices.iloc[:150].copy()
    tests = {k: (test, X[:150] + np.float32(0.1 * k), p[:150]) for k in range(3)}
    params = {**FAST, "input_dropout": 0.2, "dropout": 0.2, "epochs": 6, "patience": 2}
    one = sequence.fit_predict(slices, X, y, folds, p, tests, {**params, "num_threads": 1}, progress=False)
    assert torch.get_num_threads() == 1
    three = sequence.fit_predict(slices, X, y, folds, p, tests, {**params, "num_threads": 3}, progress=False)
    assert torch.get_num_threads() == 3  # the setting stays; the side-by-side training ran each op on one thread
    np.testing.assert_array_equal(one.curves, three.curves)
    assert one.epochs == three.epochs and one.curves.shape[1] >= 2
    for what in ("oof", "nested", "test"):
        np.testing.assert_array_equal(getattr(one, what), getattr(three, what))
    for k in range(3):
        for name, w in one.members[k].state.items():
            torch.testing.assert_close(three.members[k].state[name], w, rtol=0, atol=0)
    again = sequence.fit_predict(slices, X, y, folds, p, None, {**params, "num_threads": 2, "seed": 1},
                                 progress=False)
    assert np.abs(again.oof - one.oof).max() > 1e-4  # another seed trains other members: the check can fail


def test_blend_is_cross_fitted_and_picks_the_better_member():
    rng = np.random.default_rng(0)
    y = (rng.random((3000, 6)) < 0.2).astype(float)
    folds = np.repeat(np.arange(3), 1000)
    good = np.clip(np.where(y == 1, 0.7, 0.1) + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, y.shape)
    preds = {"a": noise, "b": good}
    w = blend.fit_weights(y, preds)
    assert w.shape == (2, 6) and np.allclose(w.sum(axis=0), 1) and (w[1] >= 0.9).all()
    out, used = blend.cross_fit(y, folds, preds)
    for k in range(3):
        rows = folds == k
        np.testing.assert_array_equal(used[k], blend.fit_weights(y[~rows], {m: q[~rows] for m, q in preds.items()}))
        np.testing.assert_allclose(out[rows], blend.apply(used[k], {m: q[rows] for m, q in preds.items()}))
    assert weighted_log_loss(y, out) <= weighted_log_loss(y, good) + 1e-3
    assert len(blend.simplex(2)) == blend.GRID + 1 and len(blend.simplex(3)) == (blend.GRID + 1) * (blend.GRID + 2) // 2


def test_stage_two_with_both_members_end_to_end_and_saved(stage_one):
    """run_stacking with LightGBM + sequence: honest rows for each, the blend, and stacking.apply equal to it."""
    from stacking.apply import apply_stage_two
    tmp, train, test, _ = stage_one
    cfg = PredictCfg(name="both", experiments=["e"], k_neighbors=2, pca_components=2, lgb=PARAMS,
                     num_boost_round=60, early_stopping_rounds=10, members=["lightgbm", "sequence"],
                     sequence={k: v for k, v in FAST.items() if k != "epochs"} | {"epochs": 6})
    lines = []
    res = run_stacking(cfg, train_slices=train, test_slices=test, model_dir=tmp / "models", logs_dir=tmp / "logs",
                       progress=False, log=lines.append)
    table = res["metrics"]
    assert list(table.index) == ["prior baseline", "e", "stage two: lightgbm",
                                 "stage two: lightgbm (rounds picked on the scored fold, optimistic)",
                                 "stage two: sequence",
                                 "stage two: sequence (epochs picked on the scored fold, optimistic)", STAGE_TWO]
    w = table["weighted"]
    assert w[STAGE_TWO] < w["e"] and w["stage two: sequence"] < w["e"]
    assert "blend weights per label" in lines[-1] and "weights fitted on the other folds" in lines[-1]
    weights = pd.read_csv(tmp / "logs" / "stacking" / "both" / "blend_weights.csv", index_col=0)
    assert list(weights.index) == ["lightgbm", "sequence"] and np.allclose(weights.sum(), 1)
    members = res["member_tests"]
    expect = sum(weights.loc[m].to_numpy() * members[m][list(LABELS)].to_numpy() for m in members)
    np.testing.assert_allclose(res["test"][list(LABELS)].to_numpy(), expect, rtol=1e-9)
    assert (tmp / "logs" / "stacking" / "both" / "sequence_curves.png").stat().st_size > 5000
    curves = pd.read_csv(tmp / "logs" / "stacking" / "both" / "sequence_curves.csv")
    assert list(curves.columns) == ["fold", "epoch", "valid_loss", "train_loss"] and curves.notna().all().all()
    assert sorted(curves["fold"].unique()) == [0, 1, 2] and curves.groupby("fold")["epoch"].max().iloc[0] >= 1
    again = apply_stage_two(cfg, tmp / "models", test.iloc[::-1])  # any row order
    got = again.set_index("image_id").loc[res["test"]["image_id"], list(LABELS)].to_numpy()
    np.testing.assert_allclose(got, res["test"][list(LABELS)].to_numpy(), rtol=1e-5, atol=1e-7)
    # the config must match what was saved
    from stacking.run import StackingError
    with pytest.raises(StackingError, match="holds the members"):
        apply_stage_two(PredictCfg(name="both", experiments=["e"], members=["lightgbm"]), tmp / "models", test)


@pytest.mark.parametrize("bad, message", [
    ({"members": ["lightgbm", "transformer"]}, "members must list one or both of lightgbm, sequence"),
    ({"members": []}, "members must list"),
    ({"members": ["sequence"], "sequence": {"epochs": 0}}, "sequence.epochs must be a whole number >= 1, got 0"),
    ({"sequence": {"hiden": 32}}, "unknown sequence setting"),
    ({"sequence": {"dropout": 1.0}}, "sequence.dropout must be a number in"),
    ({"sequence": {"device": "tpu"}}, "sequence.device must be auto, cpu or cuda"),
    ({"sequence": {"optimizer": "lion"}}, "sequence.optimizer must be adamw or adam"),
    ({"pca_alignment": "test"}, "pca_alignment must be procrustes or sign"),
    ({"sequence": {"schedule": "linear"}}, "sequence.schedule must be early_stop or cosine"),
    ({"sequence": {"input_dropout": 1.0}}, "sequence.input_dropout must be a number >= 0 and < 1"),
    ({"sequence": {"seeds": 0}}, "sequence.seeds must be a whole number >= 1"),
    ({"sequence": {"diffs": "yes"}}, "sequence.diffs must be true or false"),
])
def test_bad_member_configs_are_one_line_errors(tmp_path, bad, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"experiments": ["x"], **bad}))
    with pytest.raises(ConfigError, match=message) as err:
        load_predict_config(path)
    assert "\n" not in str(err.value)


def test_shipped_configs_turn_the_member_on():
    from conftest import REPO
    for name in ("default", "demo"):
        cfg = load_predict_config(REPO / "configs" / "predict" / f"{name}.yaml")
        assert cfg.members == ["lightgbm", "sequence"], name


def test_member_optimizers_are_the_configs_choices():
    import inspect
    from stacking import config
    assert set(sequence.OPTIMIZERS) == {"adamw", "adam"}
    assert all(f"'{name}'" in inspect.getsource(config.check_members) or f'"{name}"' in
               inspect.getsource(config.check_members) for name in sequence.OPTIMIZERS)
    net = torch.nn.Linear(2, 1)
    assert isinstance(sequence.create_optimizer(net.parameters(), {**FAST, "optimizer": "adam"}), torch.optim.Adam)


def test_flipped_series_are_the_same_series_read_backwards():
    """sequence.flip: the member reads a series reversed and puts its outputs back in slice order: the
    same outputs as for a slice table whose slice_index runs the other way, and not those read forwards."""
    slices, X, p, y, folds = series_problem(n_series=6, seed=5)
    backwards = slices.assign(slice_index=slices["n_slices"] - 1 - slices["slice_index"])
    data = sequence._Data(X, p, y, "cpu")
    torch.manual_seed(0)
    net = sequence.SeriesNet(X.shape[1], hidden=8).eval()
    torch.nn.init.normal_(net.head.weight)
    series, reversed_series = sequence.Series.of(slices), sequence.Series.of(backwards)
    which = np.arange(len(series.lengths))
    with torch.no_grad():
        ahead, rows, mask = data.logits(net, series, which)
        flipped = data.logits(net, series, which, flip=True)[0]
        read_back, rows_back, mask_back = data.logits(net, reversed_series, which)
    got = dict(zip(rows[mask].tolist(), flipped[mask]))
    expect = dict(zip(rows_back[mask_back].tolist(), read_back[mask_back]))
    assert sorted(got) == sorted(expect)
    torch.testing.assert_close(torch.stack([got[r] for r in sorted(got)]),
                               torch.stack([expect[r] for r in sorted(got)]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ahead[mask], flipped[mask], atol=1e-4)


@pytest.mark.parametrize("diffs", [False, True])
def test_padding_never_reaches_a_real_slice(diffs):
    """A series' outputs are the same alone and in a batch padded to a longer series (both directions;
    with neighbour differences too: the last real slice has no next one, whatever the padding holds)."""
    torch.manual_seed(0)
    net = sequence.SeriesNet(5, hidden=8, layers=2, dropout=0.0, diffs=diffs).eval()
    torch.nn.init.normal_(net.head.weight)  # not the zero start: the test must see the GRUs
    short, long = torch.randn(1, 7, 5), torch.randn(1, 12, 5)
    alone = net(short, torch.tensor([7]))
    padded = torch.cat([torch.cat([short, torch.full((1, 5, 5), 1e3)], 1), long])  # wild padding values
    together = net(padded, torch.tensor([7, 12]))
    torch.testing.assert_close(together[0, :7], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1:], net(long, torch.tensor([12])), rtol=1e-5, atol=1e-5)
    # and reversal in place keeps the padding at the end
    x = torch.arange(8.0).reshape(2, 4, 1)
    assert sequence.reverse_padded(x, torch.tensor([3, 4]))[..., 0].tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]


def test_neighbour_differences_stay_inside_the_series():
    """diffs: each slice's inputs, its difference to the previous slice and to the next, 0 at the ends."""
    net = sequence.SeriesNet(2, hidden=4, diffs=True).eval()
    x = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [6.0, 3.0], [99.0, 99.0]]])  # 3 real slices, then padding
    got = net.inputs(x, torch.tensor([3]))[0, :3]
    expect = torch.tensor([[1, 0, 0, 0, 2, 1], [3, 1, 2, 1, 3, 2], [6, 3, 3, 2, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(got, expect)
    assert net.proj[0].in_features == 6


def test_crops_are_windows_of_one_series():
    """crop: each series longer than the window is cut to `crop` consecutive slices of its own, at random
    places (both ends reached over draws); shorter series stay whole."""
    slices, X, p, y, folds = series_problem(n_series=12, seed=3)
    series = sequence.Series.of(slices)
    data = sequence._Data(X, p, y, "cpu")
    net = sequence.SeriesNet(X.shape[1], hidden=4).eval()
    which, crop, rng = np.arange(len(series.lengths)), 5, np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        with torch.no_grad():
            _, rows, mask = data.logits(net, series, which, crop=crop, rng=rng)
        for b, s in enumerate(which):
            own = series.index[s, :series.lengths[s]]
            got = rows[b][mask[b]].numpy()
            assert len(got) == min(crop, series.lengths[s])
            start = int(np.flatnonzero(own == got[0])[0])
            np.testing.assert_array_equal(got, own[start:start + len(got)])  # consecutive, in slice order
            starts.add((s, start))
    longest = int(np.argmax(series.lengths))
    assert {start for s, start in starts if s == longest} == set(range(int(series.lengths[longest]) - crop + 1))


def test_fixed_schedule_picks_nothing_so_fold_k_labels_move_nothing_of_fold_k():
    """schedule cosine: every member keeps its last epoch; with fold 0's validation labels inverted, the
    OOF and the blend's nested predictions stay exactly the same (only fold 0's curve moves)."""
    slices, X, p, y, folds = series_problem(seed=4)
    params = {**FAST, "schedule": "cosine", "epochs": 3, "diffs": True, "input_dropout": 0.2, "crop": 10,
              "aux_weight": 0.5, "seeds": 2}
    before = sequence.fit_predict(slices, X, y, folds, p, None, params, progress=False)
    y_valid = y.copy()
    y_valid[folds == 0] = 1 - y_valid[folds == 0]
    after = sequence.fit_predict(slices, X, y, folds, p, None, params, progress=False, y_valid=y_valid)
    assert before.epochs == after.epochs == {0: 3, 1: 3, 2: 3}
    np.testing.assert_array_equal(before.oof, after.oof)
    np.testing.assert_array_equal(before.nested, after.nested)
    assert not np.allclose(before.curves[0], after.curves[0]) and np.allclose(before.curves[1:], after.curves[1:])
    assert before.train_curves.shape == (3, 3) and np.isfinite(before.train_curves).all()
    assert weighted_log_loss(y, before.oof) < weighted_log_loss(y, p)


def test_seeds_average_their_logits_and_train_each_on_its_own_loss():
    torch.manual_seed(0)
    params = {**FAST, "seeds": 3, "aux_weight": 0.5}
    net = sequence.make_net(4, params)
    for sub in net.nets:
        torch.nn.init.normal_(sub.head.weight)
        torch.nn.init.normal_(sub.aux.weight)
    x, n = torch.randn(2, 6, 4), torch.tensor([6, 4])
    net.eval()
    torch.testing.assert_close(net(x, n), torch.stack([sub(x, n) for sub in net.nets]).mean(0))
    net.train()
    out = net(x, n)
    assert out.shape == (2, 6, 3 * 12)  # per seed: main (6) and aux (6) side by side
    y, mask = torch.zeros(2, 6, 6), torch.ones(2, 6, dtype=torch.bool)
    total, main = sequence._training_loss(out, y, mask, 0.5)
    parts = out.split(12, -1)
    expect_main = float(sum(sequence._loss(q[..., :6], y, mask) for q in parts).detach()) / 3
    expect_aux = float(sum(sequence._loss(q[..., 6:], y, mask) for q in parts).detach()) / 3
    assert main == pytest.approx(expect_main) and float(total.detach()) == pytest.approx(expect_main + 0.5 * expect_aux)
