"""Stage one on test keeps aligned PCA scores, not embeddings, and stage two gives the same predictions.

With `pca_alignment: sign` each fold model's PCA is fitted on its OOF
embeddings alone, so stage one on test can fit it first and stream each
batch's scores to disk (test_fold{k}_pcs.npy, pca_width float32 columns)
instead of the embeddings (test_fold{k}_emb.npy, 6.8 GB at the
competition's size). Here the kept road is driven through its real parts
(stacking.stage_one.fit_test_pcas, pipeline.batch.StreamSink fed in batches
as the engine feeds it, ich.stage_one.write_outputs) on generated stage-one
outputs, and stage two on it is compared with stage two on the embeddings.
predict.py end to end: tests/test_streaming.py.
"""
import shutil

import numpy as np
import pandas as pd
import pytest

from ich import stage_one as files
from ich.labels import LABELS
from stacking.config import PredictCfg
from stacking.run import run_stacking
from stacking.stage_one import fit_test_pcas, load_stage_one, kept_of_test
from test_stacking_honest import K_FOLDS, PARAMS, stage_one_outputs

# The two roads feed stage two the same numbers: the same float16 embeddings (the engine hands them to the
# sink as float16, which is what the embeddings file stores), through the same fitted PCA (stage two reads
# test_pca.joblib instead of refitting), transformed row by row in float64 and stored as float32. What can
# differ is the last float32 bit of a score (BLAS may sum a batch of 37 rows in another order than 3,000),
# i.e. about 1e-7 relative; LightGBM compares a feature with bin thresholds, so such a difference moves a
# prediction only for a value within 1e-7 of a threshold. SCORES_TOL bounds the scores, PRED_TOL the
# stage-two probabilities (far below any difference that matters to the metric, far above float noise).
SCORES_TOL, PRED_TOL = 1e-5, 1e-6
BATCH = 37  # rows per engine batch: not a divisor of the test rows, so the last batch is short


def keep_scores(cfg, model_dir, train, test):
    """What pipeline.batch.stage_one_test does on the kept road, with the engine's outputs read from the
    generated files: fit the PCAs, stream each batch's scores, write the outputs (which removes the
    embeddings)."""
    from pipeline.batch import StreamSink
    pcas = fit_test_pcas(cfg, model_dir, train)
    d = model_dir / "e"
    sink = StreamSink({("e", k): files.fold_test_part(d, k, "scores") for k in range(K_FOLDS)}, pcas)
    probs = {k: pd.read_parquet(files.fold_test_probs(d, k)) for k in range(K_FOLDS)}
    emb = {k: np.load(files.fold_test_embeddings(d, k)) for k in range(K_FOLDS)}
    for start in range(0, len(test), BATCH):
        for k in range(K_FOLDS):
            sink.add_outputs(("e", k), probs[k][list(LABELS)].to_numpy()[start:start + BATCH],
                             emb[k][start:start + BATCH])
    sink.close()
    key = files.outputs_key("cache", {}, {}, len(test), "digest", kept_of_test(cfg))
    files.write_outputs(d, key, probs[0]["image_id"], {k: p[list(LABELS)].to_numpy() for k, p in probs.items()},
                        {k: sink.finish(("e", k), len(test)) for k in range(K_FOLDS)},
                        {"spec": kept_of_test(cfg), "models": {k: pcas["e", k] for k in range(K_FOLDS)}})


def test_kept_scores_give_the_embeddings_road_submission(tmp_path):
    tmp, train, test, _ = stage_one_outputs(tmp_path, 300)
    cfg = PredictCfg(name="t", experiments=["e"], k_neighbors=2, pca_components=3, lgb=PARAMS,
                     num_boost_round=60, early_stopping_rounds=10)
    assert cfg.keeps_test_scores and kept_of_test(cfg)["pca_width"] == 3
    embeddings_dir = tmp / "models_emb"
    shutil.copytree(tmp / "models", embeddings_dir)
    quiet = dict(progress=False, log=lambda *a: None)
    want = run_stacking(cfg, train_slices=train, test_slices=test, model_dir=embeddings_dir, logs_dir=tmp / "l1",
                        **quiet)

    keep_scores(cfg, tmp / "models", train, test)
    d = tmp / "models" / "e"
    assert not list(d.glob("test_fold*_emb.npy")) and not list(d.glob("*.part"))
    for k in range(K_FOLDS):
        scores = np.load(files.fold_test_scores(d, k))
        assert scores.dtype == np.float32 and scores.shape == (len(test), 3)
    # the scores equal the embeddings road's view of each fold model
    _, views = load_stage_one(cfg, embeddings_dir, train, test)
    for k in range(K_FOLDS):
        np.testing.assert_allclose(np.load(files.fold_test_scores(d, k)), views[k].pcs["e"], rtol=0,
                                   atol=SCORES_TOL)
    got = run_stacking(cfg, train_slices=train, test_slices=test, model_dir=tmp / "models", logs_dir=tmp / "l2",
                       **quiet)
    np.testing.assert_allclose(got["oof"][list(LABELS)].to_numpy(), want["oof"][list(LABELS)].to_numpy(),
                               rtol=0, atol=PRED_TOL)
    np.testing.assert_allclose(got["test"][list(LABELS)].to_numpy(), want["test"][list(LABELS)].to_numpy(),
                               rtol=0, atol=PRED_TOL)
    # the saved stage two (the study path's) applies the same PCAs, so it reads the scores' predictions too
    from stacking.apply import apply_stage_two
    again = apply_stage_two(cfg, tmp / "models", test)
    np.testing.assert_allclose(again[list(LABELS)].to_numpy(), got["test"][list(LABELS)].to_numpy(), rtol=0,
                               atol=1e-9)


def test_scores_of_another_pca_are_not_read(tmp_path):
    """Scores kept for one PCA width are not read for another: stage two asks for stage one again
    (predict.py reruns it by itself: the width is in the test outputs' key)."""
    from stacking.stage_one import StackingError
    tmp, train, test, _ = stage_one_outputs(tmp_path, 120)
    cfg = PredictCfg(name="t", experiments=["e"], k_neighbors=1, pca_components=3)
    keep_scores(cfg, tmp / "models", train, test)
    load_stage_one(cfg, tmp / "models", train, test)
    wider = PredictCfg(name="t", experiments=["e"], k_neighbors=1, pca_components=4)
    assert kept_of_test(wider) != kept_of_test(cfg)
    with pytest.raises(StackingError, match=r"test_fold0_emb\.npy not found.*predict\.py"):
        load_stage_one(wider, tmp / "models", train, test)
    # procrustes aligns the fold models on the test embeddings: it keeps them
    assert kept_of_test(PredictCfg(pca_components=3, pca_alignment="procrustes")) == "embeddings"
    assert kept_of_test(PredictCfg(pca_components=3, test_embeddings=True)) == "embeddings"
    assert kept_of_test(PredictCfg(pca_components=0)) is None
