"""Stage two is honest: test features like the OOF ones, OOF rounds not picked on the scored fold.

Each test here would have failed on the stage two of before (one PCA on
the mixture of fold models' OOF embeddings applied to fold-averaged test
embeddings and probabilities; early stopping on the fold then scored).
"""
import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.decomposition import PCA

from ich.labels import LABELS
from ich.metric import weighted_log_loss
from stacking.config import PredictCfg
from stacking.features import build_features
from stacking.model import early_stop, fit_predict, pick_rounds
from stacking.run import (STAGE_TWO, STAGE_TWO_OPTIMISTIC, StackingError, load_stage_one, run_stacking,
                          stage_two_features)

K_FOLDS, EMB_DIM, SERIES_LEN = 3, 16, 10
PARAMS = {"objective": "binary", "verbose": -1, "num_leaves": 7, "min_data_in_leaf": 20, "learning_rate": 0.1,
          "num_threads": 1, "seed": 0}


# --- generated stage-one outputs, fold models with rotated embedding spaces ------------------------------

def make_slices(n_series: int, rng, prefix: str) -> pd.DataFrame:
    """Series of SERIES_LEN slices, half with a run of one subtype; patient-grouped folds."""
    y = np.zeros((n_series, SERIES_LEN, 6))
    for s in range(n_series):
        if s % 2:
            a = int(rng.integers(0, SERIES_LEN - 5))
            y[s, a:a + int(rng.integers(2, 6)), int(rng.integers(0, 5))] = 1
    y[..., 5] = y[..., :5].max(-1)
    s, i = np.divmod(np.arange(n_series * SERIES_LEN), SERIES_LEN)
    table = pd.DataFrame({"image_id": [f"ID_{prefix}{r}" for r in range(len(s))], "series_id": [f"S{x}" for x in s],
                          "patient_id": [f"P{x // 2}" for x in s], "slice_index": i, "n_slices": SERIES_LEN,
                          "z_spacing": 5.0, "fold": (s // 2) % K_FOLDS,
                          "brain_fraction": 0.6 * np.sin(np.pi * (i + 0.5) / SERIES_LEN) + 0.05 * rng.random(len(s))})
    return table.assign(**dict(zip(LABELS, y.reshape(-1, 6).T)))


TIES = np.r_[0.8, 0.6, 0.7, 0.5, np.full(EMB_DIM - 4, 0.2)]


def latent(y_any: np.ndarray, rng, tie: np.ndarray = TIES) -> np.ndarray:
    """What a CNN's embedding encodes: EMB_DIM latent features, tied to `any` by `tie`, distinct variances."""
    u = (2 * y_any - 1) + rng.normal(0, 1, len(y_any))
    u = (u - u.mean()) / u.std()
    sd = np.r_[4.0, 3.0, 2.2, 1.6, np.linspace(0.5, 0.2, EMB_DIM - 4)]
    noise = rng.normal(0, 1, (len(y_any), EMB_DIM))
    return (tie * u[:, None] + np.sqrt(1 - tie ** 2) * noise) * sd


class FoldModel:
    """Stage-one fold model j: its own rotation and offset of the embedding space, its own noise."""

    def __init__(self, rng):
        self.rotation = np.linalg.qr(rng.normal(size=(EMB_DIM, EMB_DIM)))[0]
        self.offset = rng.normal(0, 3, EMB_DIM)
        self.rng = rng

    def outputs(self, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logit = 1.5 * (2 * y - 1) + self.rng.normal(0, 1.3, y.shape)
        return 1 / (1 + np.exp(-logit)), (z @ self.rotation + self.offset).astype(np.float16)


def write_stage_one(model_dir, exp: str, train: pd.DataFrame, test: pd.DataFrame, seed: int = 0,
                    tie: np.ndarray = TIES) -> dict:
    """The stage-one contract: oof.parquet + oof_emb.npy, fold{k}.oof.parquet, test_fold{k}.parquet + _emb.npy.

    No test.parquet / test_emb.npy (the fold means): stage two must not need them.
    Returns the arrays, for building old-style features in the tests.
    """
    rng = np.random.default_rng(seed)
    d = model_dir / exp
    d.mkdir(parents=True)
    models = [FoldModel(rng) for _ in range(K_FOLDS)]
    y, y_test = train[list(LABELS)].to_numpy(), test[list(LABELS)].to_numpy()
    z, z_test = latent(y[:, 5], rng, tie), latent(y_test[:, 5], rng, tie)
    oof_p, oof_e = np.zeros((len(train), 6)), np.zeros((len(train), EMB_DIM), np.float16)
    test_p, test_e = {}, {}
    for k, m in enumerate(models):
        held = (train["fold"] == k).to_numpy()
        oof_p[held], oof_e[held] = m.outputs(y[held], z[held])
        test_p[k], test_e[k] = m.outputs(y_test, z_test)
        pd.DataFrame({"image_id": train["image_id"][held]}).to_parquet(d / f"fold{k}.oof.parquet")
        pd.DataFrame({"image_id": test["image_id"], **dict(zip(LABELS, test_p[k].T))}).to_parquet(
            d / f"test_fold{k}.parquet")
        np.save(d / f"test_fold{k}_emb.npy", test_e[k])
    # oof rows in another order than slices.parquet: stage two aligns by image_id
    perm = rng.permutation(len(train))
    pd.DataFrame({"image_id": train["image_id"].to_numpy()[perm], **dict(zip(LABELS, oof_p[perm].T))}).to_parquet(
        d / "oof.parquet")
    np.save(d / "oof_emb.npy", oof_e[perm])
    return {"oof_p": oof_p, "oof_e": oof_e, "test_p": test_p, "test_e": test_e, "z": z}


def stage_one_outputs(tmp_path, n_series: int, tie: np.ndarray = TIES):
    rng = np.random.default_rng(1)
    train = make_slices(n_series, rng, "tr")
    # the test slices are the train slices' twins (same series, same labels, fresh images and stage-one noise):
    # any difference between test and OOF feature distributions then comes from stage one's outputs only
    test = train.drop(columns=["fold"]).assign(image_id=lambda t: t["image_id"].str.replace("tr", "te"))
    arrays = write_stage_one(tmp_path / "models", "e", train, test, tie=tie)
    return tmp_path, train, test, arrays


@pytest.fixture
def stage_one(tmp_path):
    return stage_one_outputs(tmp_path, 300)


# --- A: test features come from the distribution the boosters were trained on -----------------------------

KS_BOUND = 0.1


def ks_by_feature(X_test: np.ndarray, X: np.ndarray, names: list[str]) -> pd.Series:
    return pd.Series([ks_2samp(X_test[:, i], X[:, i], nan_policy="omit", method="asymp").statistic
                      for i in range(len(names))], index=names)


def test_test_features_match_oof_features_in_distribution(tmp_path):
    """KS statistic per feature, test (each fold-model pairing) against OOF, under KS_BOUND = 0.1.

    The bound: 12,000 OOF and 12,000 test rows with the same labels, in 1,200
    series. Two samples of n and m independent rows from one distribution
    give P(KS > 0.1) <= 2 exp(-2 * 0.1^2 * n m / (n + m)). Per-series
    statistics (mean / max / std) take one value per series, so count n = m
    = 1,200 series for them: 2 exp(-12) = 1e-5 per feature, under 1e-3 over
    the ~60 (series feature, fold model) pairs; per-slice features, n = m =
    12,000 (neighbors overlap, which shrinks that a few fold, still far
    within), far less. A real mismatch, as the old features show below, gives
    well above 0.2.
    """
    tmp, train, test, arrays = stage_one_outputs(tmp_path, 1200)
    cfg = PredictCfg(experiments=["e"], k_neighbors=2, pca_components=4)
    feats = stage_two_features(cfg, tmp / "models", train, test)
    pc_cols = [n for n in feats.names if ".pc" in n]
    assert len(pc_cols) == 4 * 3 and sorted(feats.X_test) == [0, 1, 2]
    for k in feats.X_test:
        ks = ks_by_feature(feats.test_matrix(k), feats.X, feats.names)
        assert ks.max() < KS_BOUND, f"fold model {k}: {ks.sort_values().tail(5)}"
    # the PCs of differently rotated fold models agree on the OOF rows too: fold j against the other folds
    for j in range(K_FOLDS):
        held = (train["fold"] == j).to_numpy()
        assert ks_by_feature(feats.X[held], feats.X[~held], feats.names)[pc_cols].max() < KS_BOUND
    # not only the marginals: on every fold model's rows, PC i is the same function of the latent features
    reference = PCA(4, random_state=0).fit_transform(arrays["z"])
    for i in range(4):
        corr = [np.corrcoef(feats.X[held, feats.names.index(f"e.pc{i}")], reference[held, i])[0, 1]
                for held in (train["fold"].to_numpy() == j for j in range(K_FOLDS))]
        assert min(np.abs(corr)) > 0.9 and len(set(np.sign(corr))) == 1, (i, corr)
    # base for test pairing k: fold model k's probabilities (one experiment: exactly them)
    np.testing.assert_allclose(feats.base_test[1], arrays["test_p"][1], rtol=1e-6)

    # the old way: one PCA on the OOF mixture of fold models, applied to fold-averaged test embeddings,
    # and fold-averaged test probabilities
    pca = PCA(4, random_state=0).fit(arrays["oof_e"].astype(np.float32))
    old_X, old_names = build_features(train, {"e": arrays["oof_p"]}, k=2,
                                      embeddings={"e": pca.transform(arrays["oof_e"].astype(np.float32))})
    mean_e = np.mean([e.astype(np.float32) for e in arrays["test_e"].values()], axis=0)
    old_test, _ = build_features(test, {"e": np.mean(list(arrays["test_p"].values()), axis=0)}, k=2,
                                 embeddings={"e": pca.transform(mean_e)})
    assert old_names == feats.names
    old_ks = ks_by_feature(old_test, old_X, old_names)
    assert old_ks[pc_cols].max() > 2 * KS_BOUND  # the embeddings' PCs: a different distribution at test time
    assert old_ks["e.any"] > KS_BOUND             # averaged probabilities are less extreme than one model's


def test_pca_components_mean_the_same_for_every_fold_model(tmp_path):
    """On images every fold model scored (the test set), component i of fold model j and of fold model k
    correlate >= 0.9, also for components that say nothing about `any` (whose signs the `any` anchor cannot
    fix: before the Procrustes alignment they came out at about -1 between some fold models)."""
    tie = np.r_[0.8, 0.0, 0.0, 0.0, np.full(EMB_DIM - 4, 0.1)]
    tmp, train, test, _ = stage_one_outputs(tmp_path, 300, tie=tie)
    cfg = PredictCfg(experiments=["e"], k_neighbors=1, pca_components=4, pca_alignment="procrustes")
    _, views = load_stage_one(cfg, tmp / "models", train, test)
    worst = min(np.corrcoef(views[j].pcs["e"][:, i], views[k].pcs["e"][:, i])[0, 1]
                for i in range(4) for j in range(K_FOLDS) for k in range(j + 1, K_FOLDS))
    assert worst >= 0.9, worst
    # the OOF rows get the same rotation: PC i of every fold's rows is one function of the latent features
    feats = stage_two_features(cfg, tmp / "models", train, test)
    for k, view in views.items():
        np.testing.assert_allclose(feats.test_matrix(k)[:, feats.names.index("e.pc1")], view.pcs["e"][:, 1],
                                   rtol=1e-5)


def test_one_pca_per_fold_model_serves_both_widths(tmp_path):
    """sequence.pca_components wider than pca_components: one PCA of the wider width per (experiment,
    fold model); LightGBM's features are its first pca_components columns, equal to what a PCA of
    pca_components alone gives, and the sequence member's view holds the wider width."""
    from ich.config import ConfigError
    from stacking.config import load_predict_config
    tmp, train, test, _ = stage_one_outputs(tmp_path, 200)
    both = PredictCfg(experiments=["e"], k_neighbors=1, pca_components=2, members=["lightgbm", "sequence"],
                      sequence={"pca_components": 5})
    assert both.pca_width == 5 and both.sequence_pca_components == 5
    assert PredictCfg(pca_components=2, sequence={"pca_components": 5}).pca_width == 2  # no member: not read
    assert PredictCfg(pca_components=3, members=["lightgbm", "sequence"]).pca_width == 3  # null: the same
    narrow = PredictCfg(experiments=["e"], k_neighbors=1, pca_components=2)
    wide_feats = stage_two_features(both, tmp / "models", train, test)
    narrow_feats = stage_two_features(narrow, tmp / "models", train, test)
    assert wide_feats.train.pcs["e"].shape[1] == 5 and wide_feats.tests[0].pcs["e"].shape[1] == 5
    assert wide_feats.names == narrow_feats.names and "e.pc2" not in wide_feats.names
    np.testing.assert_allclose(wide_feats.X, narrow_feats.X, rtol=1e-4, atol=1e-4)
    for k in range(K_FOLDS):
        np.testing.assert_allclose(wide_feats.test_matrix(k), narrow_feats.test_matrix(k), rtol=1e-4, atol=1e-4)
    assert wide_feats.train.first_pcs(both.sequence_pca_components)["e"].shape[1] == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [e]\nsequence: {pca_components: -1}\n")
    with pytest.raises(ConfigError, match="sequence.pca_components"):
        load_predict_config(bad)


def test_standardized_components_carry_the_oof_scale_to_test(tmp_path):
    """pca_standardize: each fold model's components have mean 0 and std 1 on its own OOF rows, and its
    test rows go through the very same map (saved with stage two)."""
    tmp, train, test, _ = stage_one_outputs(tmp_path, 200)
    cfg = PredictCfg(experiments=["e"], k_neighbors=1, pca_components=3, pca_standardize=True)
    oof, views = load_stage_one(cfg, tmp / "models", train, test)
    folds = train["fold"].to_numpy()
    for k in range(K_FOLDS):
        own = oof.pcs["e"][folds == k]
        np.testing.assert_allclose(own.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(own.std(axis=0), 1, atol=1e-4)
        emb = np.load(tmp / "models" / "e" / f"test_fold{k}_emb.npy").astype(np.float32)
        test_rows = pd.read_parquet(tmp / "models" / "e" / f"test_fold{k}.parquet")["image_id"]
        expect = oof.pca_models["e", k].transform(emb)[pd.Index(test_rows).get_indexer(test["image_id"])]
        np.testing.assert_allclose(views[k].pcs["e"], expect, rtol=1e-5, atol=1e-5)
    plain, _ = load_stage_one(PredictCfg(experiments=["e"], k_neighbors=1, pca_components=3), tmp / "models",
                              train, test)
    assert np.abs(plain.pcs["e"][folds == 0].std(axis=0) - 1).max() > 0.1  # not so without the option


def test_missing_fold_test_outputs_say_to_rerun_stage_one(stage_one):
    tmp, train, test, _ = stage_one
    (tmp / "models" / "e" / "test_fold1.parquet").unlink()
    cfg = PredictCfg(experiments=["e"], k_neighbors=1)
    with pytest.raises(StackingError, match=r"test_fold1\.parquet not found.*run predict\.py"):
        stage_two_features(cfg, tmp / "models", train, test)
    stage_two_features(cfg, tmp / "models", train, None)  # OOF only: not needed
    (tmp / "models" / "e" / "test_fold2_emb.npy").unlink()
    cfg.pca_components = 2
    with pytest.raises(StackingError, match=r"test_fold[12].* not found.*run predict\.py"):
        stage_two_features(cfg, tmp / "models", train, test)


def test_run_stacking_pairs_fold_models_and_never_reads_fold_means(stage_one):
    tmp, train, test, arrays = stage_one
    exp_dir = tmp / "models" / "e"
    (exp_dir / "test.parquet").write_text("not a parquet: stage two must not read the fold mean")
    (exp_dir / "test_emb.npy").write_text("not an npy either")
    cfg = PredictCfg(name="t", experiments=["e"], k_neighbors=2, pca_components=2, lgb=PARAMS,
                     num_boost_round=60, early_stopping_rounds=10)
    lines = []
    res = run_stacking(cfg, train_slices=train, test_slices=test, model_dir=tmp / "models", logs_dir=tmp / "logs",
                       progress=False, log=lines.append)
    table = res["metrics"]
    assert list(table.index) == ["prior baseline", "e", STAGE_TWO, STAGE_TWO_OPTIMISTIC]
    assert table.loc[STAGE_TWO_OPTIMISTIC, "weighted"] <= table.loc[STAGE_TWO, "weighted"] < table.loc["e", "weighted"]
    assert STAGE_TWO_OPTIMISTIC in lines[-1] and "honest" in lines[-1]
    # saved boosters hold n_k rounds; the test prediction is the mean over k of booster k on fold model k's features
    feats = stage_two_features(cfg, tmp / "models", train, test)
    assert "brain_fraction.rel_series_max" in feats.names and "e.pc1.diff_next1" in feats.names
    rounds = res["rounds"].set_index(["label", "fold"])["rounds"]
    expect = np.zeros(len(test))
    for k in range(K_FOLDS):
        b = lgb.Booster(model_file=str(res["out_dir"] / "boosters" / f"any_fold{k}.txt"))
        assert b.num_trees() == rounds["any", k]
        base = feats.base_test[k][:, 5].astype(np.float64)  # fold model k's `any`: the init score of pairing k
        raw = b.predict(feats.test_matrix(k), raw_score=True) + np.log(base / (1 - base))
        expect += 1 / (1 + np.exp(-raw)) / K_FOLDS
    np.testing.assert_allclose(res["test"]["any"].to_numpy(), expect, rtol=1e-5, atol=1e-7)


# --- B: the number of rounds is not picked on the fold that is scored ------------------------------------

def test_pick_rounds_never_looks_at_the_scored_fold():
    rng = np.random.default_rng(0)
    t = np.arange(300)
    curves = 0.5 - 0.1 * (1 - np.exp(-t / 40)) + 0.0004 * t + rng.normal(0, 0.002, (4, 300))
    honest, stopped = pick_rounds(curves, patience=20)
    assert stopped.all()
    optimistic = early_stop(curves, 20)[0]
    for k in range(4):
        other = curves.copy()
        other[k] = np.where(t < 5, curves[k], curves[k] + 1.0)  # fold k's labels say: stop at round 5
        assert pick_rounds(other, 20)[0][k] == honest[k]
        assert early_stop(other, 20)[0][k] <= 5 != optimistic[k]  # the old protocol follows fold k
    # the honest rule is early stopping on the mean of the other folds' curves
    assert honest[0] == early_stop(curves[1:].mean(axis=0, keepdims=True), 20)[0][0]


def noise_problem(seed=0, n_series=150):
    """Features that say nothing about the labels: any round > 0 only fits noise."""
    rng = np.random.default_rng(seed)
    slices = make_slices(n_series, rng, "n")
    slices = slices[~((slices["fold"] == 1) & (slices["slice_index"] >= 7))]  # fold sizes differ: folds by size
    y = slices[list(LABELS)].to_numpy()
    X = rng.normal(size=(len(slices), 20)).astype(np.float32)
    return X, y, slices["fold"].to_numpy()


def test_scored_fold_cannot_move_its_own_oof(monkeypatch):
    """Whatever fold k's validation curve says, its rounds and its OOF stay; the old protocol follows it.

    Fold k's validation curve is the only way fold k's labels reach the
    rounds of the booster scored on fold k (booster k never trains on them).
    Permuting fold k's labels would also change the other folds' boosters,
    which do train on fold k, so no rule short of nested retraining keeps
    n_k fixed under that; what must hold, and did not before, is that n_k
    is not read off fold k's own curve. Here that curve is falsified (it
    claims the best round is the second) and nothing about fold k may change.
    """
    X, y, folds = noise_problem()
    names = [f"f{i}" for i in range(X.shape[1])]
    fit = lambda: fit_predict(X, y, folds, None, params=PARAMS, feature_names=names,  # noqa: E731
                              num_boost_round=150, early_stopping_rounds=15, progress=False)
    before = fit()
    k, size_k = 1, int((folds == 1).sum())
    assert np.bincount(folds).tolist().count(size_k) == 1
    true_eval = lgb.Booster.eval_valid

    def falsified(self, feval=None):
        out = true_eval(self, feval)
        if self.valid_sets[0].num_data() == size_k and self.current_iteration() > 2:
            out = [type(r)(r.dataset_name, r.metric_name, r.metric_value + 1.0, r.maximize) for r in out]
        return out

    monkeypatch.setattr(lgb.Booster, "eval_valid", falsified)
    after = fit()
    held = folds == k
    for label in LABELS:
        assert after.rounds[label, k] == before.rounds[label, k]
        assert after.rounds_optimistic[label, k] <= 2  # early stopping on the scored fold obeys its curve
    np.testing.assert_array_equal(after.oof[held], before.oof[held])
    assert not np.array_equal(after.oof_optimistic[held], before.oof_optimistic[held])


def test_optimistic_protocol_beats_the_honest_one_on_noise():
    X, y, folds = noise_problem(seed=2)
    names = [f"f{i}" for i in range(X.shape[1])]
    res = fit_predict(X, y, folds, None, params=PARAMS, feature_names=names, num_boost_round=150,
                      early_stopping_rounds=15, progress=False)
    honest, optimistic = weighted_log_loss(y, res.oof), weighted_log_loss(y, res.oof_optimistic)
    assert optimistic < honest  # picking rounds on the scored fold fits its noise
    assert any(res.rounds[key] != res.rounds_optimistic[key] for key in res.rounds)
    for label in LABELS:  # each fold's honest rounds are early stopping on the other folds' mean curve
        curves = res.curves[label]
        for i, k in enumerate(sorted(np.unique(folds))):
            others = np.delete(curves, i, axis=0).mean(axis=0, keepdims=True)
            assert res.rounds[label, k] == early_stop(others, 15)[0][0]


def test_saved_stage_two_reproduces_the_batch_test_predictions(stage_one):
    """stacking.apply (boosters + PCAs from disk, no training) equals what run_stacking predicted."""
    from stacking.apply import apply_stage_two
    from stacking.run import StackingError
    tmp, train, test, _ = stage_one
    for pca in (2, 0):
        cfg = PredictCfg(name=f"saved{pca}", experiments=["e"], k_neighbors=2, pca_components=pca, lgb=PARAMS,
                         num_boost_round=60, early_stopping_rounds=10)
        res = run_stacking(cfg, train_slices=train, test_slices=test, model_dir=tmp / "models",
                           logs_dir=tmp / "logs", progress=False, log=lambda *a: None)
        again = apply_stage_two(cfg, tmp / "models", test.iloc[::-1])  # any row order
        got = again.set_index("image_id").loc[res["test"]["image_id"], list(LABELS)].to_numpy()
        np.testing.assert_allclose(got, res["test"][list(LABELS)].to_numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(StackingError, match="run predict.py"):
        apply_stage_two(PredictCfg(name="never", experiments=["e"]), tmp / "models", test)
