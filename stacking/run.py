"""Stage two end to end: read stage-one outputs, check folds, features, boosting, outputs.

Reads MODEL_CHECKPOINT_DIR/<experiment>/oof.parquet (+ oof_emb.npy when PCA
features are on) for every configured experiment, and, when test predictions
are wanted, test_fold{k}.parquet (+ test_fold{k}_emb.npy) of every stage-one
fold model k, never the fold-averaged test.parquet / test_emb.npy: every
feature vector a booster sees comes from one stage-one model, at training
and at test time alike (`load_stage_one`, `stage_two_features`). Writes to
MODEL_CHECKPOINT_DIR/stacking/<name>/: oof.parquet, test.parquet, stage_two.joblib,
boosters/<label>_fold<k>.txt (n_k rounds each), config.json; and to
LOGS_DIR/stacking/<name>/: metrics.csv (the log-loss table, TABLE_NOTE says
what each stage-two row is), rounds.csv (rounds per label and fold, honest
and optimistic) and feature_importance.png.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import joblib
from sklearn.decomposition import PCA

from ich import stage_one
from ich.cache import write_atomic
from ich.labels import LABELS
from ich.metric import log_loss_table

from .config import PredictCfg
from .features import build_features, series_inputs
from . import blend
from .model import fit_predict, logit

ANY = LABELS.index("any")
COMMON_ROWS = 20_000  # test images on which the fold models' PCAs are aligned
ALIGN_WIDTH = 4       # each fold model's own PCA keeps 4 x pca_components dimensions to align (common_components)
SAVED = "stage_two.joblib"  # what stacking.apply needs besides the boosters: per-fold-model PCAs, feature names
SAVED_VERSION = 2            # 2: aligned PCAs, members and blend weights
SEQUENCE_SAVED = "sequence.pt"  # the sequence members (torch), beside SAVED
STAGE_TWO = "stage two"
STAGE_TWO_OPTIMISTIC = "stage two (rounds picked on the scored fold, optimistic)"
TABLE_NOTE = ("Stage-two rows are honest out-of-fold scores: each fold scored by models whose number of rounds "
              "(LightGBM) or epochs (sequence) was picked on the other folds, and, with two members, "
              f"'{STAGE_TWO}' is their per-label blend with weights fitted on the other folds too. Rows marked "
              "'optimistic' are the same models stopped where the scored fold itself is best, for comparison only.")


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
        piece = stage_one.fold_oof(exp_dir, k)
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
    pcs: dict[str, np.ndarray] = field(default_factory=dict)  # (n, pca_components); empty without PCA
    pca_models: dict = field(default_factory=dict)  # (experiment, fold k) -> AlignedPCA of fold model k (train view)


@dataclass
class AlignedPCA:
    """One stage-one fold model's embeddings -> the experiment's common components.

    transform(emb) = pca.transform(emb) @ rotation - offset: the fold
    model's own PCA, then a linear map into components shared by every fold
    model of the experiment (`common_components`), or, without common
    images, a sign flip per component (`fit_signed_pca`: rotation diagonal,
    offset 0).
    """
    pca: PCA
    rotation: np.ndarray  # (own components, common components)
    offset: np.ndarray | float = 0.0

    def transform(self, emb: np.ndarray) -> np.ndarray:
        return (self.pca.transform(emb) @ self.rotation - self.offset).astype(np.float32)


def fit_signed_pca(emb: np.ndarray, anchor: np.ndarray, n_components: int, max_rows: int = 100_000) -> AlignedPCA:
    """PCA of one model's embeddings (at most max_rows of them), each component made to correlate
    positively with `anchor` (the model's logit of `any` on the same rows).

    Fold models of one experiment learn the same things in differently
    oriented embedding spaces (another seed and other data give another
    basis: emb_j = z R_j for some rotation R_j, at best). The principal
    components of each model's own embeddings are invariant to its rotation
    up to their signs (and, for components of close variance, up to a
    rotation among them). The anchor fixes the sign of the components that
    correlate with `any`; the others keep a coin-flip sign (measured on the
    demo: PC1 of two fold models at -0.97), which `align_fold_models` then
    fixes on images every fold model has scored.
    """
    rows = np.random.default_rng(0).permutation(len(emb))[:max_rows]
    pca = PCA(n_components, random_state=0).fit(emb[rows])
    scores = pca.transform(emb[rows])
    a = anchor[rows] - anchor[rows].mean()
    sign = np.where((scores - scores.mean(axis=0)).T @ a < 0, -1.0, 1.0)
    return AlignedPCA(pca, np.diag(sign))


def align_fold_models(scores: dict[int, np.ndarray], iterations: int = 10) -> dict[int, np.ndarray]:
    """Orthogonal rotations that bring each fold model's PCA scores on common images into one frame.

    scores[k]: (n, c) fold model k's (signed) PCA scores of the same n
    unlabeled images, in the same row order. Generalized Procrustes: start
    from the first fold model's frame, rotate every model onto the current
    reference (scipy's orthogonal_procrustes, on centered scores), take the
    mean of the rotated scores as the next reference, a few times over.
    Rotations, not arbitrary linear maps: a model's components keep their
    variances and stay uncorrelated, and the map cannot fit noise.
    Returns {k: R_k}, to right-multiply onto fold model k's scores.
    """
    from scipy.linalg import orthogonal_procrustes

    centered = {k: s - s.mean(axis=0) for k, s in scores.items()}
    ref = next(iter(centered.values()))
    rotations = {}
    for _ in range(iterations):
        rotations = {k: orthogonal_procrustes(s, ref)[0] for k, s in centered.items()}
        new_ref = np.mean([s @ rotations[k] for k, s in centered.items()], axis=0)
        if np.allclose(new_ref, ref, atol=1e-6 * (np.abs(ref).max() + 1e-12)):
            break
        ref = new_ref
    return rotations


def common_components(wide: np.ndarray, folds: np.ndarray, models: dict, common: dict[int, np.ndarray],
                      anchor: np.ndarray, n_components: int) -> tuple[dict, np.ndarray]:
    """The experiment's components, the same function for every fold model (issue 16).

    wide: (n, m) the OOF rows, each through its own fold model's PCA of m >
    n_components components (`models[k]`); common[k]: (n_common, m) fold
    model k's scores of the common (test) images. Each fold model's m-d
    space is rotated onto the others' (`align_fold_models`), then one PCA of
    the aligned OOF rows of all fold models picks n_components components,
    their signs fixed by `anchor` (the `any` logit). Aligning m = 4 x
    n_components dimensions rather than the n_components themselves matters:
    the fold models' top components span slightly different subspaces, and
    on the demo the 4th component of two fold models correlated at 0.47
    after aligning 4 dimensions.
    Returns ({k: AlignedPCA}, the OOF rows' components (n, n_components)).
    """
    rotations = align_fold_models(common)
    aligned = np.empty_like(wide)
    for k, r in rotations.items():
        aligned[folds == k] = wide[folds == k] @ r
    rows = np.random.default_rng(0).permutation(len(aligned))[:100_000]
    shared = PCA(n_components, random_state=0).fit(aligned[rows])
    scores = shared.transform(aligned[rows])
    a = anchor[rows] - anchor[rows].mean()
    sign = np.where((scores - scores.mean(axis=0)).T @ a < 0, -1.0, 1.0)
    projection = shared.components_.T * sign
    offset = shared.mean_ @ projection
    out = {k: AlignedPCA(models[k].pca, models[k].rotation @ rotations[k] @ projection, offset) for k in rotations}
    return out, (aligned @ projection - offset).astype(np.float32)


def _test_fold_path(exp_dir: Path, k: int, emb: bool = False) -> Path:
    path = (stage_one.fold_test_embeddings if emb else stage_one.fold_test_probs)(exp_dir, k)
    if not path.is_file():
        raise StackingError(f"{path} not found: stage two needs the test outputs of each stage-one fold model "
                            f"of {exp_dir.name} (test_fold{{k}}.parquet and test_fold{{k}}_emb.npy, not the "
                            "fold-averaged test.parquet); run predict.py (stage one on test) again, with --force "
                            "if it reuses older test outputs")
    return path


def _embeddings(path: Path, rows: np.ndarray, n_expected: int) -> np.ndarray:
    if not path.is_file():
        raise StackingError(f"{path} not found: PCA features (pca_components) need stage one's embeddings; "
                            "rerun that stage or set pca_components: 0")
    emb = np.load(path, mmap_mode="r")
    if len(emb) != n_expected:
        raise StackingError(f"{path} has {len(emb)} rows, its predictions {n_expected}: rerun that stage")
    return np.asarray(emb[rows], dtype=np.float32)


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
    With pca_components, one PCA per (experiment, fold model k), fitted on
    that model's own OOF rows (fold k) and applied to them and to that
    model's test embeddings (`fit_signed_pca`); a single PCA of the OOF rows
    of all fold models would mix K differently oriented spaces. With test
    slices, the K PCAs (of ALIGN_WIDTH x pca_components dimensions) of an
    experiment are then rotated into one frame on the test images, which
    every fold model has scored (unlabeled, so no label reaches stage two
    through it), and one PCA of the aligned OOF rows picks the components
    every fold model shares (`common_components`). Without test slices (an
    OOF-only run) each fold model keeps its own components, signs fixed.
    Returns (train view, {k: test view of fold model k}) (None without test_slices).
    """
    folds = train_slices["fold"].to_numpy()
    fold_ids = [int(k) for k in sorted(np.unique(folds))]
    train = StageOne({})
    for exp in cfg.experiments:
        d = model_dir / exp
        if not (d / "oof.parquet").is_file():
            raise StackingError(f"{d / 'oof.parquet'} not found: run train.py for experiment {exp} first")
        check_folds(d, train_slices)
        train.probs[exp], rows, n_oof = _aligned(d / "oof.parquet", train_slices["image_id"], "train stage-one")
        if not cfg.pca_components:
            continue
        c = cfg.pca_components
        width = None  # each fold model's own components: ALIGN_WIDTH x c when they are aligned on test images
        pcs, models = None, {}
        for k in fold_ids:
            held = np.flatnonzero(folds == k)
            emb = _embeddings(d / "oof_emb.npy", rows[held], n_oof)
            if width is None:
                width = min(ALIGN_WIDTH * c, emb.shape[1], len(held)) if test_slices is not None else c
                pcs = np.empty((len(train_slices), width), dtype=np.float32)
            models[k] = fit_signed_pca(emb, logit(train.probs[exp][held, ANY]), width)
            pcs[held] = models[k].transform(emb)
        if test_slices is not None:
            common = _common_scores(d, test_slices, models)
            models, pcs = common_components(pcs, folds, models, common, logit(train.probs[exp][:, ANY]), c)
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
    with its embeddings through that model's own PCA (`pca_models[(experiment, k)]`)."""
    outputs = {}
    for exp in cfg.experiments:
        d = model_dir / exp
        probs, rows, n = _aligned(_test_fold_path(d, k), slices["image_id"], f"fold {k} test stage-one")
        emb = _embeddings(_test_fold_path(d, k, emb=True), rows, n) if cfg.pca_components else None
        outputs[exp] = (probs, emb)
    return view_of(cfg, outputs, k, pca_models)


def view_of(cfg: PredictCfg, outputs: dict, k: int, pca_models: dict) -> StageOne:
    """Fold model k's outputs on some rows ({experiment: (probabilities, embeddings or None)}, rows
    aligned) -> the view stage two reads: the probabilities, and the embeddings through that fold model's
    own aligned PCA. The one place both the file path above and the in-memory engine
    (pipeline.engine) make it."""
    view = StageOne({})
    for exp in cfg.experiments:
        probs, emb = outputs[exp]
        view.probs[exp] = np.asarray(probs, np.float32)
        if cfg.pca_components:
            view.pcs[exp] = pca_models[exp, k].transform(np.asarray(emb, np.float32))
    return view


@dataclass
class Features:
    """The members' inputs: OOF rows, and test rows once per stage-one fold model k.

    X / X_test are the boosters' neighbour features; `train` / `tests` the
    stage-one views they were built from, which the sequence member reads
    directly (it sees the neighbours itself).
    """
    X: np.ndarray
    names: list[str]
    probs: dict[str, np.ndarray]                # experiment -> its OOF probabilities
    base: np.ndarray | None                     # mean stage-one OOF probability (start_from_stage_one)
    X_test: dict[int, np.ndarray] | None = None  # k -> test features from fold model k
    base_test: dict[int, np.ndarray] | None = None  # k -> mean over experiments of fold model k's probabilities
    pca_models: dict = field(default_factory=dict)  # (experiment, fold k) -> AlignedPCA (saved with the boosters)
    train: StageOne | None = None                # the OOF view
    tests: dict[int, StageOne] | None = None     # k -> fold model k's test view


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
        return build_features(slices, view.probs, k=cfg.k_neighbors, embeddings=view.pcs or None,
                              neighbors=cfg.neighbors)

    X, names = build(train_slices, train)
    out = Features(X, names, train.probs, mean_probs(train) if cfg.start_from_stage_one else None,
                   pca_models=train.pca_models, train=train, tests=tests)
    if tests is not None:
        out.X_test = {}
        for k, view in tests.items():
            out.X_test[k], test_names = build(test_slices, view)
            if test_names != names:
                raise StackingError("train and test slices.parquet give different features ("
                                    + ", ".join(sorted(set(names) ^ set(test_names))[:5])
                                    + "): prepare both splits with the same prepare_data.py")
        out.base_test = {k: mean_probs(view) for k, view in tests.items()} if cfg.start_from_stage_one else None
    return out


def mean_probs(view: StageOne) -> np.ndarray:
    """The mean over experiments of a view's stage-one probabilities: where both members start from."""
    return np.mean(list(view.probs.values()), axis=0)


def importance_plot(names, gain, path: Path, top: int = 30) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = np.argsort(gain)[::-1][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(order) + 1.2))
    ax.barh([names[i] for i in order], gain[order] / max(gain.sum(), 1e-12))
    ax.set(xlabel="share of total gain (all labels and folds)", title="stage two: top features")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_stacking(cfg: PredictCfg, *, train_slices: pd.DataFrame, test_slices: pd.DataFrame | None,
                 model_dir: Path, logs_dir: Path, progress: bool = True, log=print) -> dict:
    """Features (`stage_two_features`), the members (LightGBM: `stacking.model.fit_predict`; the
    sequence model: `stacking.sequence.fit_predict`), their per-label blend (`stacking.blend`), outputs
    (module docstring).

    Every stage-two row of the metrics table is honest (TABLE_NOTE): each
    member's rounds or epochs picked on the other folds, the blend's weights
    fitted on the other folds; the optimistic rows beside them are the same
    models scored the old way, for comparison only.
    """
    feats = stage_two_features(cfg, model_dir, train_slices, test_slices)
    y = train_slices[list(LABELS)].to_numpy(np.float64)
    folds = train_slices["fold"].to_numpy()
    log(f"stage two: {feats.X.shape[0]} train rows x {feats.X.shape[1]} features from {', '.join(cfg.experiments)}"
        + (f"; {len(test_slices)} test rows x {len(feats.X_test)} stage-one fold models" if test_slices is not None
           else "") + f"; members: {', '.join(cfg.members)}")
    members = {}
    res = None
    if "lightgbm" in cfg.members:
        res = fit_predict(feats.X, y, folds, feats.X_test, params=cfg.lgb_params, feature_names=feats.names,
                          num_boost_round=cfg.num_boost_round, early_stopping_rounds=cfg.early_stopping_rounds,
                          progress=progress, base=feats.base, base_test=feats.base_test)
        members["lightgbm"] = Member(res.oof, res.test, res.oof_optimistic)
    seq = None
    if "sequence" in cfg.members:
        from . import sequence  # torch: only with the sequence member (tests/test_layout.py)
        inputs = lambda slices, view: series_inputs(slices, view.probs, view.pcs)  # noqa: E731
        tests = None if feats.tests is None else {
            k: (test_slices, inputs(test_slices, view), feats.base_test[k] if feats.base_test else None)
            for k, view in feats.tests.items()}
        seq = sequence.fit_predict(train_slices, inputs(train_slices, feats.train), y, folds, feats.base, tests,
                                   cfg.sequence_params, progress=progress)
        members["sequence"] = Member(seq.oof, seq.test, seq.oof_optimistic)
    oof_members = {name: m.oof for name, m in members.items()}
    weights = blend.fit_weights(y, oof_members)
    oof_blend, _ = blend.cross_fit(y, folds, oof_members)
    test_final = blend.apply(weights, {n: m.test for n, m in members.items()}) if test_slices is not None else None

    out_dir, log_dir = model_dir / "stacking" / cfg.name, logs_dir / "stacking" / cfg.name
    (out_dir / "boosters").mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "boosters").glob("*.txt"):  # a rerun with other folds or without LightGBM
        old.unlink()
    if res is not None:
        for (label, k), booster in res.boosters.items():
            booster.save_model(str(out_dir / "boosters" / f"{label}_fold{k}.txt"),
                               num_iteration=res.rounds[(label, k)])
    if seq is not None:
        import torch
        write_atomic(out_dir / SEQUENCE_SAVED, lambda p: torch.save(
            {"members": {k: dataclasses.asdict(m) for k, m in seq.members.items()},
             "params": cfg.sequence_params}, p))
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    saved = {"version": SAVED_VERSION, "feature_names": feats.names,
             "folds": sorted(int(k) for k in np.unique(folds)), "pca": feats.pca_models,
             "rounds": res.rounds if res is not None else {}, "members": list(members),
             "blend_weights": weights}
    write_atomic(out_dir / SAVED, lambda p: joblib.dump(saved, p))
    oof = _frame(train_slices, oof_blend)
    write_atomic(out_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    result = {"out_dir": out_dir, "oof": oof, "blend_weights": pd.DataFrame(weights, index=list(members),
                                                                            columns=list(LABELS))}
    if test_slices is not None:
        test = _frame(test_slices, test_final)
        write_atomic(out_dir / "test.parquet", lambda p: test.to_parquet(p, index=False))
        result["test"] = test
        result["member_tests"] = {name: _frame(test_slices, m.test) for name, m in members.items()}

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
        result["sequence_curves_plot"] = curves_plot(seq.curves, log_dir / "sequence_curves.png")
    weights_text = "\n".join(f"  {label:17s} " + ", ".join(f"{name} {weights[i, j]:.2f}"
                                                            for i, name in enumerate(members))
                             for j, label in enumerate(LABELS))
    log("out-of-fold weighted log loss (lower is better):\n" + format_table(table) + "\n" + TABLE_NOTE
        + (f"\nblend weights per label (fitted on all folds, applied to test):\n{weights_text}"
           if len(members) > 1 else ""))
    return result


@dataclass
class Member:
    """What one stage-two member gives: honest OOF, test (mean over fold pairings), optimistic OOF."""
    oof: np.ndarray
    test: np.ndarray | None
    oof_optimistic: np.ndarray


def member_rows(members: dict[str, Member], oof_blend: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics table's stage-two rows (TABLE_NOTE): one member alone keeps the historic row names."""
    picked = {"lightgbm": "rounds", "sequence": "epochs"}
    if len(members) == 1:
        (name, m), = members.items()
        return {STAGE_TWO: m.oof, f"stage two ({picked[name]} picked on the scored fold, optimistic)":
                m.oof_optimistic}
    rows = {}
    for name, m in members.items():
        rows[f"stage two: {name}"] = m.oof
        rows[f"stage two: {name} ({picked[name]} picked on the scored fold, optimistic)"] = m.oof_optimistic
    rows[STAGE_TWO] = oof_blend
    return rows


def _frame(slices: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs, columns=list(LABELS))
    out.insert(0, "image_id", slices["image_id"].to_numpy())
    return out


def curves_plot(curves: np.ndarray, path: Path) -> Path:
    """The sequence members' validation curves (one per fold) and their mean: where training stopped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = np.arange(1, curves.shape[1] + 1)
    for i, c in enumerate(curves):
        ax.plot(epochs, c, lw=1, alpha=0.6, label=f"member {i} on its fold")
    ax.plot(epochs, curves.mean(axis=0), color="black", lw=2, label="mean")
    ax.set(xlabel="epoch", ylabel="validation weighted log loss", title="stage two: sequence member")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(table: pd.DataFrame) -> str:
    width = max(22, *(len(name) + 1 for name in table.index))
    short = {"epidural": "epidural", "intraparenchymal": "intraparen", "intraventricular": "intravent",
             "subarachnoid": "subarach", "subdural": "subdural", "any": "any", "weighted": "WEIGHTED"}
    head = " " * width + "".join(f"{short[c]:>11s}" for c in table.columns)
    lines = [head]
    for name, row in table.iterrows():
        lines.append(f"{name:{width}s}" + "".join(f"{v:11.4f}" for v in row.to_numpy()))
    return "\n".join(lines)
