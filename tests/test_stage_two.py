"""Stage two (features, boosting, fold check), the submission, and predict.py end to end."""
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_script, write_predict_config
from ich.config import ConfigError
from ich.labels import LABELS
from ich.submission import SubmissionError, build_submission, read_sample
from stacking.config import load_predict_config
from stacking.features import build_features
from stacking.model import fit_predict
from stacking.stage_one import StackingError, check_folds


def toy_slices():
    return pd.DataFrame({"image_id": list("abcde"), "series_id": ["s2", "s1", "s1", "s2", "s1"],
                         "slice_index": [1, 0, 2, 0, 1], "n_slices": [2, 3, 3, 2, 3], "z_spacing": [5.0] * 5})


def test_neighbor_features_follow_series_order():
    slices = toy_slices()
    p = np.arange(30, dtype=float).reshape(5, 6) / 30
    X, names = build_features(slices, {"e": p}, k=2)
    f = pd.DataFrame(X, columns=names, index=slices.image_id)
    # series s1 in slice order: b (0.2), e (0.8), c (0.4); s2: d (0.6), a (0.0)
    assert f.loc["e", "e.epi.prev1"] == pytest.approx(0.2) and f.loc["e", "e.epi.next1"] == pytest.approx(0.4)
    assert f.loc["c", "e.epi.prev2"] == pytest.approx(0.2) and np.isnan(f.loc["c", "e.epi.next1"])
    assert np.isnan(f.loc["b", "e.epi.prev1"]) and np.isnan(f.loc["a", "e.epi.prev2"])
    assert f.loc["e", "e.epi.diff_prev1"] == pytest.approx(0.6)
    assert f.loc["a", "e.epi.series_max"] == pytest.approx(0.6) and f.loc["b", "e.epi.series_mean"] == pytest.approx(
        (0.2 + 0.8 + 0.4) / 3)
    assert list(f["rel_position"]) == [1.0, 0.0, 1.0, 0.0, 0.5]
    assert len(names) == len(set(names)) == 3 + 6 * (1 + 4 * 2 + 3)


def test_brain_fraction_features_and_their_absence():
    slices = toy_slices().assign(brain_fraction=[0.0, 0.1, 0.3, 0.0, 0.6])
    p = np.arange(30, dtype=float).reshape(5, 6) / 30
    X, names = build_features(slices, {"e": p}, k=2)
    f = pd.DataFrame(X, columns=names, index=slices.image_id)
    # s1 in slice order: b 0.1, e 0.6, c 0.3; s2: d 0.0, a 0.0 (no brain at all)
    assert f.loc["e", "brain_fraction"] == pytest.approx(0.6)
    assert f.loc["b", "brain_fraction.series_mean"] == pytest.approx(1 / 3)
    assert f.loc["c", "brain_fraction.series_max"] == pytest.approx(0.6)
    assert f.loc["c", "brain_fraction.rel_series_max"] == pytest.approx(0.5)
    assert f.loc["e", "brain_fraction.rel_series_max"] == pytest.approx(1.0)
    assert np.isnan(f.loc["a", "brain_fraction.rel_series_max"]) and f.loc["a", "brain_fraction.series_max"] == 0
    assert len(names) == len(set(names)) == 3 + 4 + 6 * (1 + 4 * 2 + 3)
    # an old slices.parquet without the column: the four features are left out, the rest unchanged
    X_old, old = build_features(toy_slices(), {"e": p}, k=2)
    assert [n for n in names if n not in old] == ["brain_fraction", "brain_fraction.series_mean",
                                                  "brain_fraction.series_max", "brain_fraction.rel_series_max"]
    np.testing.assert_array_equal(X_old, f[old].to_numpy())


def test_neighbors_of_the_mean_or_of_each_experiment():
    slices = toy_slices()
    p = np.arange(30, dtype=float).reshape(5, 6) / 30
    probs = {"a": p, "b": p ** 2}
    X, names = build_features(slices, probs, k=2)  # default: neighbors of the mean
    f = pd.DataFrame(X, columns=names, index=slices.image_id)
    assert "mean.epi.prev1" in names and "a.epi.prev1" not in names and "b.epi.series_max" in names
    assert f.loc["e", "mean.epi.next1"] == pytest.approx((0.4 + 0.4 ** 2) / 2)  # slice c, mean of a and b
    assert f.loc["e", "mean.epi.diff_prev1"] == pytest.approx((0.8 + 0.64) / 2 - (0.2 + 0.04) / 2)
    per_exp, shared = 6 * (1 + 3), 6 * (1 + 4 * 2)
    assert len(names) == len(set(names)) == 3 + 2 * per_exp + shared
    X_each, names_each = build_features(slices, probs, k=2, neighbors="each")
    assert len(names_each) == 3 + 2 * (per_exp + 6 * 4 * 2) + 6 and "b.epi.diff_next2" in names_each
    # one experiment: the same features either way
    one, one_names = build_features(slices, {"a": p}, k=2)
    assert one_names == build_features(slices, {"a": p}, k=2, neighbors="each")[1]
    with pytest.raises(ValueError, match="neighbors"):
        build_features(slices, probs, neighbors="median")


def synthetic_series(n_series=120, seed=0):
    """Series with contiguous positive runs and a noisy stage one: neighbors carry signal."""
    rng = np.random.default_rng(seed)
    rows, probs = [], []
    for s in range(n_series):
        n = int(rng.integers(20, 40))
        y = np.zeros((n, 6))
        if rng.random() < 0.5:
            j = int(rng.integers(0, 5))
            a = int(rng.integers(0, n - 6))
            y[a:a + int(rng.integers(3, 7)), j] = 1
        y[:, 5] = y[:, :5].max(1)
        logit = (y * 2 - 1) * 1.2 + rng.normal(0, 1.5, y.shape)
        probs.append(1 / (1 + np.exp(-logit)))
        for i in range(n):
            rows.append({"image_id": f"ID_{s}_{i}", "series_id": f"S{s}", "patient_id": f"P{s // 2}",
                         "slice_index": i, "n_slices": n, "z_spacing": 5.0, "fold": (s // 2) % 3,
                         **dict(zip(LABELS, y[i]))})
    return pd.DataFrame(rows), np.concatenate(probs)


def test_stage_two_beats_noisy_stage_one():
    from ich.metric import weighted_log_loss
    slices, p = synthetic_series()
    X, names = build_features(slices, {"e": p}, k=3)
    y = slices[list(LABELS)].to_numpy()
    res = fit_predict(X, y, slices["fold"].to_numpy(), {k: X[:50] for k in range(3)},
                      params={"objective": "binary", "verbose": -1,
                      "num_leaves": 7, "min_data_in_leaf": 20, "learning_rate": 0.1, "num_threads": 1},
                      feature_names=names, num_boost_round=200, early_stopping_rounds=20, progress=False)
    assert np.isfinite(res.oof).all() and res.test.shape == (50, 6)
    assert len(res.boosters) == 18 and res.importance.sum() > 0
    assert weighted_log_loss(y, res.oof) < 0.8 * weighted_log_loss(y, p)


def test_folds_are_checked_not_assumed(tmp_path):
    slices = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "fold": [0, 0, 1, 1]})
    for k, ids in ((0, ["a", "b"]), (1, ["c", "d"])):
        pd.DataFrame({"image_id": ids}).to_parquet(tmp_path / f"fold{k}.oof.parquet")
    check_folds(tmp_path, slices)
    pd.DataFrame({"image_id": ["a", "c"]}).to_parquet(tmp_path / "fold0.oof.parquet")
    with pytest.raises(StackingError, match="fold 0 of stage one differs"):
        check_folds(tmp_path, slices)


def test_predict_config_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"experiments": []}))
    with pytest.raises(ConfigError, match="experiments"):
        load_predict_config(path)
    path.write_text(yaml.safe_dump({"experiments": ["x"], "k_neigbours": 3}))
    with pytest.raises(ConfigError, match="k_neigbours"):
        load_predict_config(path)


def test_submission_order_and_fallbacks(tmp_path):
    ids = ["ID_a", "ID_b", "ID_c", "ID_d"]
    sample = pd.DataFrame({"ID": [f"{i}_{c}" for i in ids[::-1] for c in LABELS], "Label": 0.5})
    sample.to_csv(tmp_path / "sample.csv", index=False)
    sample = read_sample(tmp_path / "sample.csv")
    preds = pd.DataFrame({"image_id": ["ID_a", "ID_c"], **{c: [0.2, 0.6] for c in LABELS}})
    test_slices = pd.DataFrame({"image_id": ["ID_a", "ID_c"], "series_id": ["S", "S"], "z": [0.0, 10.0]})
    rejected = pd.DataFrame({"image_id": ["ID_b", None], "series_id": ["S", None], "z": [5.0, np.nan],
                             "reason": ["pixel_decode_failed", "not_dicom"]})
    prior = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.1])
    sub, stats = build_submission(sample, preds, prior=prior, test_slices=test_slices, rejected=rejected,
                                  clip=(0.001, 0.999))
    assert sub["ID"].tolist() == sample["ID"].tolist()  # exactly the sample's rows and order
    got = sub.assign(image=sub.ID.str.rsplit("_", n=1).str[0]).groupby("image")["Label"].first()
    assert got["ID_a"] == 0.2 and got["ID_c"] == 0.6
    assert got["ID_b"] == pytest.approx(0.4)  # between its series neighbors
    assert got["ID_d"] == pytest.approx(0.01)  # never seen: the prior
    assert (stats.predicted, stats.from_neighbors, stats.from_prior) == (2, 1, 1)
    sub, _ = build_submission(sample, preds.assign(any=1.0), prior=prior, clip=(0.001, 0.999))
    assert sub["Label"].max() == 0.999


def test_predict_end_to_end(prepared, trained):
    settings, _, work = trained
    cfg = write_predict_config(work / "predict.yaml", k_neighbors=3, num_boost_round=300, early_stopping_rounds=30,
                               lgb={"num_leaves": 7, "min_data_in_leaf": 10, "learning_rate": 0.05})
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    sub = pd.read_csv(work / "sub" / "submission.csv")
    sample = pd.read_csv(prepared / "raw" / "stage_2_sample_submission.csv")
    assert sub["ID"].tolist() == sample["ID"].tolist()
    assert sub["Label"].between(1e-6, 1 - 1e-6).all()
    assert "test weighted log loss (labels known): stage one" in out.stdout
    assert "kaggle competitions submit -c rsna-intracranial-hemorrhage-detection" in out.stdout
    # stage-one test outputs (contract 2) and stage-two outputs (contract 3)
    tiny = work / "models" / "tiny"
    n_test = len(pd.read_parquet(prepared / "clean" / "test" / "slices.parquet"))
    test = pd.read_parquet(tiny / "test.parquet")
    assert len(test) == n_test  # the fold mean, for stage-one-only submissions
    for k in pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")["fold"].unique():
        assert len(pd.read_parquet(tiny / f"test_fold{k}.parquet")) == len(np.load(tiny / f"test_fold{k}_pcs.npy")) \
            == n_test  # what stage two reads: one pair per fold model (the embeddings' PCA scores: contract 2)
        assert not (tiny / f"test_fold{k}_emb.npy").exists()
    stack = work / "models" / "stacking" / "predict"
    assert len(list((stack / "boosters").glob("*_fold*.txt"))) == 18
    assert (work / "logs" / "stacking" / "predict" / "feature_importance.png").stat().st_size > 5000
    metrics = pd.read_csv(work / "logs" / "stacking" / "predict" / "metrics.csv", index_col=0)
    # 14 patients are too few for stage two to beat stage one honestly (it did only under the old,
    # optimistic rounds); that it does on larger data is checked by tests/test_benchmarks.py and the demo
    assert max(metrics.loc["stage two", "weighted"], metrics.loc["tiny", "weighted"]) < metrics.loc[
        "prior baseline", "weighted"]
    lgb_row = "stage two: lightgbm"
    assert metrics.loc[lgb_row, "weighted"] > metrics.loc[f"{lgb_row} (rounds picked on the scored fold, optimistic)",
                                                          "weighted"]
    assert {"stage two: sequence", "stage two: sequence (epochs picked on the scored fold, optimistic)"} <= set(
        metrics.index)
    # a test score per member and for the blend (the submission)
    assert re.search(r"test weighted log loss \(labels known\): stage one [\d.]+, stage two: lightgbm [\d.]+, "
                     r"stage two: sequence [\d.]+, stage two [\d.]+", out.stdout), out.stdout[-2000:]
    assert (stack / "sequence.pt").is_file()
    # a rerun reuses the stage-one test predictions; --stage1-only writes its own file
    again = run_script("predict.py", "--settings", settings, "--config", cfg, "--stage1-only")
    assert again.returncode == 0 and "reused" in again.stdout
    assert (work / "sub" / "submission_stage1.csv").is_file()


def test_two_experiments_combine(prepared, trained):
    """Stage two over two experiments: both feature sets and a 'mean of stage one' row."""
    import shutil
    from stacking.config import PredictCfg
    from stacking.run import STAGE_TWO, STAGE_TWO_OPTIMISTIC, run_stacking
    settings, _, work = trained
    models = work / "models"
    if not (models / "tiny2").exists():
        shutil.copytree(models / "tiny", models / "tiny2")
        oof = pd.read_parquet(models / "tiny2" / "oof.parquet")
        oof[list(LABELS)] = oof[list(LABELS)] ** 1.3  # a different (worse-calibrated) second model
        oof.to_parquet(models / "tiny2" / "oof.parquet", index=False)
    train = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    cfg = PredictCfg(name="two", experiments=["tiny", "tiny2"], k_neighbors=2,
                     lgb={"num_leaves": 7, "min_data_in_leaf": 10}, num_boost_round=100)
    res = run_stacking(cfg, train_slices=train, test_slices=None, model_dir=models, logs_dir=work / "logs",
                       progress=False, log=lambda *a: None)
    assert list(res["metrics"].index) == ["prior baseline", "tiny", "tiny2", "mean of stage one", STAGE_TWO,
                                          STAGE_TWO_OPTIMISTIC]
    assert res["oof"]["image_id"].tolist() == train["image_id"].tolist()


def test_test_cache_must_match_train_cache(tmp_path):
    import json
    from models.predict_split import InferenceError, check_same_cache
    meta = {"format": 1, "image_size": 64, "windows": [["brain", 40, 80]], "sigmoid": False, "crop_border": False,
            "n_files": 10, "files_digest": "x", "chunk_size": 8}
    for name, extra in (("train", {}), ("test", {"n_files": 3, "files_digest": "y"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cache_meta.json").write_text(json.dumps({**meta, **extra}))
    check_same_cache(tmp_path / "train", tmp_path / "test")  # other files, same image settings: fine
    (tmp_path / "test" / "cache_meta.json").write_text(json.dumps({**meta, "image_size": 128}))
    with pytest.raises(InferenceError, match="image_size"):
        check_same_cache(tmp_path / "train", tmp_path / "test")


def test_prior_fill_with_float32_predictions_and_duplicate_ids(tmp_path):
    """Images without prediction or series get the prior (float32 preds made pandas 3 raise)."""
    ids = ["ID_a", "ID_nodicom"]
    sample = pd.DataFrame({"ID": [f"{i}_{c}" for i in ids for c in LABELS], "Label": 0.5})
    sample.to_csv(tmp_path / "sample.csv", index=False)
    preds = pd.DataFrame({"image_id": ["ID_a"], **{c: np.float32([0.2]) for c in LABELS}})
    prior = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.1])
    sub, stats = build_submission(read_sample(tmp_path / "sample.csv"), preds, prior=prior,
                                  test_slices=preds.assign(series_id="S", z=0.0),
                                  rejected=pd.DataFrame({"image_id": [], "series_id": [], "z": []}))
    got = dict(zip(sub["ID"], sub["Label"]))
    assert got["ID_nodicom_any"] == pytest.approx(0.1) and got["ID_a_any"] == pytest.approx(0.2)
    assert (stats.predicted, stats.from_prior) == (1, 1)
    pd.concat([sample, sample.iloc[:1]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(SubmissionError, match="more than once"):
        read_sample(tmp_path / "dup.csv")


def test_flip_tta_is_an_experiment_fact_not_a_predict_setting(tmp_path):
    """TTA lived in two places (experiment for OOF, predict config for test)."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"experiments": ["x"], "tta_hflip": False}))
    with pytest.raises(ConfigError, match="train.tta_hflip"):
        load_predict_config(path)
