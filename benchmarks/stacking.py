#!/usr/bin/env python
"""Stage two at the full competition scale, on a generated stage-one table.

No images: the script generates what stage one would hand to stage two for
the real data: 752,803 train slices (series of 20 to 60 slices, one to three
series per patient, five patient-grouped folds) and 121,232 test slices, the
columns of slices.parquet, labels with about the real prevalences (about 14%
`any`) as contiguous runs of slices, and `--experiments` stage-one
experiments whose probabilities are noisy but informative and calibrated
(logit = blurred truth x a per-lesion visibility, some lesions all but
invisible, + a per-series offset + AR(1) slice noise along the series,
partly shared between the experiments; then Platt-scaled), about 0.065-0.07
weighted log loss like a single real CNN, plus a small float16 embedding
per experiment for the PCA features. Each of the 5 fold models of an
experiment adds a little logit noise of its own and has its own embedding
space (a random rotation and offset); train rows get their own fold's model
(OOF), test rows one output per fold model, written as stage one writes them
(oof.parquet, oof_emb.npy, fold{k}.oof.parquet, test_fold{k}.parquet,
test_fold{k}_emb.npy). The slice table has no brain_fraction column (real
tables give 4 features more). Then, for each scale (whole patients
subsampled, train and test alike), in a fresh child process so that peaks
do not carry over:

  features : stacking.run.stage_two_features: reading the stage-one files,
             one PCA per (experiment, fold model) (when --pca > 0), and
             stacking.features.build_features for the OOF rows and once per
             fold model for the test rows;
  boosting : stacking.model.fit_predict, 6 labels x 5 folds trained in
             lockstep with honest rounds, booster k on fold model k's test
             features, with stacking.config.DEFAULT_LGB merged with
             configs/predict/default.yaml (learning rate, leaves, rounds,
             early stopping), starting from the mean stage-one logit when
             the config says so, as stacking.run; "wll 1 -> 2" is the
             honest OOF score, the optimistic one (rounds picked on the
             scored fold) in brackets;
  peak     : the child's RSS high-water mark, per phase (features,
             lightgbm, sequence, blend: /proc/self/clear_refs resets it
             between them) and the largest of them, which includes holding
             the slice tables and the stage-one inputs.

Beside the wall seconds it prints the process's CPU seconds and how many
cores other processes kept busy meanwhile: on a shared machine the wall
time alone can mislead. The children run with OMP_WAIT_POLICY=PASSIVE
unless told otherwise (--omp-wait-policy): it costs nothing on an idle
machine (measured) and keeps LightGBM's spinning OpenMP threads from
running 5x slower whenever another process holds one of the cores.
  sequence : stacking.sequence.fit_predict on the same stage-one views
             (when the config's members list it), then the cross-fitted
             blend (stacking.blend); "seq" and "blend" are their honest OOF
             scores;
Targets on the 2-core development VM: full scale within 20 minutes and 6 GB,
LightGBM + sequence member + blend (10 minutes and 8 GB before the member).
Usage:

    .venv/bin/python benchmarks/stacking.py [--scales 0.125,0.25,0.5,1] [--experiments 2]
        [--seed 0] [--k 5] [--pca 8] [--emb-dim 64] [--config configs/predict/default.yaml]
        [--set learning_rate=0.1 --set early_stopping_rounds=20] [--omp-wait-policy passive|active|inherit]
        [--train-rows 752803 --test-rows 121232]     (fewer rows: a quick check, as tests/test_benchmarks.py)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ich.labels import LABELS, SUBTYPES  # noqa: E402

N_TRAIN, N_TEST = 752_803, 121_232
N_FOLDS = 5
FOLD_NOISE = 0.2                # logit noise of one fold model on top of its experiment's
# share of slices positive per subtype in stage_2_train.csv (any: about 14%)
PREVALENCE = {"epidural": 0.0042, "intraparenchymal": 0.048, "intraventricular": 0.035,
              "subarachnoid": 0.047, "subdural": 0.063}
SERIES_POSITIVE = 0.42          # share of series with some hemorrhage
MEAN_RUN = 0.30                 # mean run length as a share of the series


# --- generation ----------------------------------------------------------------------------------

def _series_lengths(rng, n_rows: int) -> np.ndarray:
    """Lengths in [20, 60] that add up to exactly n_rows."""
    lengths = rng.integers(20, 61, size=max(1, round(n_rows / 40)))
    diff = n_rows - int(lengths.sum())
    while diff:
        room = np.flatnonzero(lengths < 60) if diff > 0 else np.flatnonzero(lengths > 20)
        if not len(room):  # rounding left too few or too many series
            lengths = np.r_[lengths, 40] if diff > 0 else lengths[:-1]
            diff = n_rows - int(lengths.sum())
            continue
        pick = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        lengths[pick] += np.sign(diff)
        diff = n_rows - int(lengths.sum())
    return lengths


def _hex_ids(start: int, n: int, prefix: str = "ID_") -> np.ndarray:
    """Distinct 9-digit hex ids (an odd multiplier is a bijection mod 16**9)."""
    values = (np.arange(start, start + n, dtype=np.int64) * 0x9E3779B1 + 0x1234567) % 16 ** 9
    return np.array([f"{prefix}{v:09x}" for v in values], dtype=object)


def _neighbor(values: np.ndarray, series: np.ndarray, j: int) -> np.ndarray:
    """values of the slice j later (j > 0) or earlier (j < 0) in the same series; the slice itself at the ends."""
    out = values.copy()
    if j > 0:
        same = series[j:] == series[:-j]
        out[:-j][same] = values[j:][same]
    else:
        same = series[:j] == series[-j:]
        out[-j:][same] = values[:j][same]
    return out


def _platt(logit: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Calibrated probabilities per label (a trained CNN's are, roughly): sigmoid(a * logit + b) fitted by Newton."""
    out = np.empty(logit.shape, np.float64)
    for j in range(logit.shape[1]):
        x, t = logit[:, j].astype(np.float64), y[:, j].astype(np.float64)
        a, b = 1.0, 0.0
        for _ in range(25):
            p = 1 / (1 + np.exp(-(a * x + b)))
            w = np.maximum(p * (1 - p), 1e-12)
            g = np.array([np.dot(p - t, x), np.sum(p - t)])
            h = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]])
            a, b = np.array([a, b]) - np.linalg.solve(h, g)
        out[:, j] = 1 / (1 + np.exp(-(a * x + b)))
    return out


def make_split(rng, n_rows: int, id_start: int, n_exp: int, emb_dim: int, phi: float = 0.9,
               mixes: list | None = None) -> dict:
    """One split in series order: slice table (with labels), stage-one probs and embeddings per experiment.

    mixes[e]: experiment e's map from its logits to its embedding (6, emb_dim), the same network for
    both splits: the test split passes the train split's (returned under "mixes")."""
    lengths = _series_lengths(rng, n_rows)
    n_series = len(lengths)
    per_patient = rng.choice([1, 2, 3], size=n_series, p=[0.7, 0.22, 0.08])
    patient_of_series = np.repeat(np.arange(n_series), per_patient)[:n_series]
    series = np.repeat(np.arange(n_series), lengths)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    index = np.arange(n_rows) - np.repeat(first, lengths)
    n_of_row = np.repeat(lengths, lengths)

    # labels: contiguous runs around a per-series centre (subtypes overlap like real bleeds)
    positive = rng.random(n_series) < SERIES_POSITIVE
    centre = rng.uniform(0.25, 0.8, n_series) * lengths
    y = np.zeros((n_rows, len(LABELS)), np.int8)
    for j, name in enumerate(SUBTYPES):
        q = min(1.0, PREVALENCE[name] / (SERIES_POSITIVE * MEAN_RUN))
        has = positive & (rng.random(n_series) < q)
        run = np.maximum(2, np.round(lengths * rng.uniform(0.1, 2 * MEAN_RUN - 0.1, n_series)))
        start = np.clip(np.round(centre - run / 2 + rng.normal(0, 0.08, n_series) * lengths), 0, lengths - run)
        s, r = np.repeat(start, lengths), np.repeat(run, lengths)
        y[:, j] = np.repeat(has, lengths) & (index >= s) & (index < s + r)
    y[:, 5] = y[:, :5].max(axis=1)

    # stage one: evidence = blurred truth (edge slices are ambiguous) x per-lesion visibility (some
    # bleeds are all but invisible to the CNN, which no neighbor can fix), plus a per-series offset and
    # slice noise that is autocorrelated along the series (AR(1)) and shared in part between experiments
    t = y.astype(np.float32)
    t = 0.5 * t + 0.25 * (_neighbor(t, series, -1) + _neighbor(t, series, 1))
    prevalence = np.r_[[PREVALENCE[c] for c in SUBTYPES], 0.14]
    base = np.log(prevalence / (1 - prevalence)) - 1.0
    gain = np.array([5.0, 6.0, 6.5, 5.0, 5.5, 6.5])
    visible = np.where(rng.random((n_series, 6)) < 0.2, rng.uniform(0.0, 0.3, (n_series, 6)),
                       rng.uniform(0.5, 1.3, (n_series, 6)))
    present = np.zeros((n_series, 5), bool)
    np.logical_or.at(present, series, y[:, :5].astype(bool))
    visible[:, 5] = np.where(present.any(1), np.where(present, visible[:, :5], 0).max(1), visible[:, 5])
    evidence = gain * np.repeat(visible, lengths, axis=0).astype(np.float32) * t
    shared_series = rng.normal(0, 1, (n_series, 6))
    shared_slice = rng.normal(0, 1, (n_rows, 6)).astype(np.float32)
    probs, embs, own = [], [], []
    for e in range(n_exp):
        rho = 0.6  # noise shared between the experiments (same images, similar networks)
        white = rho * shared_slice + math.sqrt(1 - rho ** 2) * rng.normal(0, 1, (n_rows, 6)).astype(np.float32)
        ar = white.copy()
        for i in range(1, 61):  # AR(1) within each series, run along slice_index in lockstep
            rows = np.flatnonzero(index == i)
            ar[rows] = phi * ar[rows - 1] + math.sqrt(1 - phi ** 2) * white[rows]
        fresh = rng.normal(0, 1, (n_rows, 6)).astype(np.float32)
        effect = rho * shared_series + math.sqrt(1 - rho ** 2) * rng.normal(0, 1, (n_series, 6))
        logit = (base + evidence * (1 + 0.1 * e) + np.repeat(0.5 * effect, lengths, axis=0)
                 + 1.0 * ar + 0.3 * fresh)
        probs.append(_platt(logit, y).astype(np.float32))
        if emb_dim:
            own.append(rng.normal(0, 1, (6, emb_dim)).astype(np.float32) / math.sqrt(6))  # drawn either way
            mix = own[-1] if mixes is None else mixes[e]
            emb = logit.astype(np.float32) @ mix + rng.normal(0, 1.5, (n_rows, emb_dim)).astype(np.float32)
            embs.append(emb.astype(np.float16))
    del shared_slice

    image_id = _hex_ids(id_start, n_rows)
    series_id = _hex_ids(id_start, n_series, "ID_s")
    patient_id = _hex_ids(id_start, patient_of_series.max() + 1, "ID_p")[patient_of_series]
    spacing = rng.choice([5.0, 4.8, 5.0, 6.0, 3.0], size=n_series).astype(np.float32)
    table = pd.DataFrame({
        "image_id": image_id, "patient_id": np.repeat(patient_id, lengths),
        "study_id": np.repeat(series_id, lengths), "series_id": np.repeat(series_id, lengths),
        "z": (index * np.repeat(spacing, lengths)).astype(np.float64),
        "slice_index": index.astype(np.int32), "n_slices": n_of_row.astype(np.int32),
        "z_spacing": np.repeat(spacing, lengths)})
    for j, c in enumerate(LABELS):
        table[c] = y[:, j]
    # prepare_data writes rows sorted by (series_id, z): random series ids make that a shuffle of series
    order = np.lexsort((index, table["series_id"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    return {"table": table, "probs": [p[order] for p in probs], "embs": [e[order] for e in embs], "mixes": own}


def generate(seed: int, n_exp: int, emb_dim: int, n_train: int = N_TRAIN, n_test: int = N_TEST,
             phi: float = 0.9) -> tuple[dict, dict]:
    """phi: the correlation of stage one's slice noise between neighbouring slices (0: independent)."""
    rng = np.random.default_rng(seed)
    train = make_split(rng, n_train, 0, n_exp, emb_dim, phi)
    test = make_split(rng, n_test, 10_000_000, n_exp, emb_dim, phi, mixes=train["mixes"])
    test["labels"] = test["table"][["image_id", *LABELS]]
    test["table"] = test["table"].drop(columns=list(LABELS))
    # patient-grouped folds: patients in random order, dealt round-robin
    patients = train["table"]["patient_id"].unique()
    fold_of = pd.Series(np.arange(len(patients)) % N_FOLDS, index=rng.permutation(patients))
    train["table"]["fold"] = train["table"]["patient_id"].map(fold_of).astype(np.int8)
    fold_models(rng, train, test)
    return train, test


def fold_models(rng, train: dict, test: dict) -> None:
    """What each stage-one fold model k of an experiment outputs: the experiment's probabilities with
    FOLD_NOISE more logit noise, its embeddings in the model's own orientation (a random rotation and
    offset, as networks trained from other seeds on other data have).

    Train rows get their own fold's model (OOF); the test rows get one set per fold model
    (test["probs"][e][k], test["embs"][e][k]), as stage one on test writes them.
    """
    folds = train["table"]["fold"].to_numpy()
    for e in range(len(train["probs"])):
        dim = train["embs"][e].shape[1] if train["embs"] else 0
        spaces = [(np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32),
                   rng.normal(0, 1, dim).astype(np.float32)) for _ in range(N_FOLDS)]

        def view(k, p, emb):
            logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
            p_k = 1 / (1 + np.exp(-(logit + FOLD_NOISE * rng.standard_normal(p.shape, dtype=np.float32))))
            e_k = None if emb is None else (emb.astype(np.float32) @ spaces[k][0] + spaces[k][1]).astype(np.float16)
            return p_k.astype(np.float32), e_k

        for k in range(N_FOLDS):
            rows = folds == k
            p_k, e_k = view(k, train["probs"][e][rows], train["embs"][e][rows] if dim else None)
            train["probs"][e][rows] = p_k
            if dim:
                train["embs"][e][rows] = e_k
        views = [view(k, test["probs"][e], test["embs"][e] if dim else None) for k in range(N_FOLDS)]
        test["probs"][e] = [p_k for p_k, _ in views]
        if dim:
            test["embs"][e] = [e_k for _, e_k in views]


def experiment_names(cfg, n_exp: int) -> list[str]:
    return (list(cfg.experiments) + [f"exp{e}" for e in range(n_exp)])[:n_exp]


def write_scale(folder: Path, train: dict, test: dict, keep_train: np.ndarray, keep_test: np.ndarray,
                names: list[str]) -> None:
    """slices.parquet of both splits and, per experiment, the stage-one files stacking.run reads
    (ARCHITECTURE.md, contract 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = train["table"][keep_train].reset_index(drop=True)
    test_ids = test["table"]["image_id"][keep_test].to_numpy()
    table.to_parquet(folder / "train_slices.parquet", index=False)
    test["table"][keep_test].reset_index(drop=True).to_parquet(folder / "test_slices.parquet", index=False)
    test["labels"][keep_test].reset_index(drop=True).to_parquet(folder / "test_labels.parquet", index=False)
    for e, name in enumerate(names):
        d = folder / "models" / name
        d.mkdir(parents=True)
        probs = lambda p: pd.DataFrame(p, columns=list(LABELS))  # noqa: E731
        probs(train["probs"][e][keep_train]).assign(image_id=table["image_id"]).to_parquet(d / "oof.parquet",
                                                                                          index=False)
        for k in range(N_FOLDS):
            table.loc[table["fold"] == k, ["image_id"]].to_parquet(d / f"fold{k}.oof.parquet", index=False)
            probs(test["probs"][e][k][keep_test]).assign(image_id=test_ids).to_parquet(d / f"test_fold{k}.parquet",
                                                                                       index=False)
        if train["embs"]:
            np.save(d / "oof_emb.npy", train["embs"][e][keep_train])
            for k in range(N_FOLDS):
                np.save(d / f"test_fold{k}_emb.npy", test["embs"][e][k][keep_test])


def patient_subset(table: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Rows of a nested random subset of whole patients (about `fraction` of them)."""
    patients = table["patient_id"].unique()
    u = pd.Series(np.random.default_rng([seed, 7]).random(len(patients)), index=patients)
    return (table["patient_id"].map(u) < fraction).to_numpy() if fraction < 1 else np.ones(len(table), bool)


# --- one scale, in a child process -------------------------------------------------------------------

def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (user + system, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def rss_gb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def reset_peak() -> None:
    """Start a new RSS high-water mark (Linux: /proc/self/clear_refs 5), so each phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Phase:
    """Wall and CPU seconds, the RSS peak and other processes' busy cores of one phase of the child."""

    def __init__(self):
        reset_peak()
        self.t, self.c, self.m = time.perf_counter(), cpu_s(), machine_busy_s()

    def done(self) -> dict:
        t, c = time.perf_counter() - self.t, cpu_s() - self.c
        return {"s": t, "cpu": c, "peak_gb": rss_gb("VmHWM"),
                "other": max(0.0, (machine_busy_s() - self.m - c) / max(t, 1e-9))}


def child(folder: Path, args) -> dict:
    import dataclasses

    from ich.metric import weighted_log_loss
    from stacking.config import apply_overrides, load_predict_config
    from stacking import blend
    from stacking.run import blend_members, fit_members, stage_two_features

    cfg = apply_overrides(load_predict_config(args.config), args.set)
    cfg.experiments = experiment_names(cfg, args.experiments)
    cfg.k_neighbors, cfg.pca_components = args.k, args.pca
    train = pd.read_parquet(folder / "train_slices.parquet")
    test = pd.read_parquet(folder / "test_slices.parquet")
    rss_inputs = rss_gb()

    t0, c0, m0 = time.perf_counter(), cpu_s(), machine_busy_s()
    phases = {}
    # as stacking.run: read stage one (OOF + each fold model's test outputs), a PCA per fold model, features
    p = Phase()
    feats = stage_two_features(cfg, folder / "models", train, test)
    n_features = len(feats.names)
    phases["features"] = p.done()
    y = train[list(LABELS)].to_numpy(np.float64)
    folds = train["fold"].to_numpy()
    # the members as stacking.run.fit_members runs them (LightGBM first, which then drops its feature
    # matrices), one call each so that each has its own time and peak, then the blend
    members = {}
    for name in ["lightgbm"] + [m for m in cfg.members if m != "lightgbm"]:
        p = Phase()
        members.update(fit_members(dataclasses.replace(cfg, members=[name]), feats, train, test, y, folds,
                                   progress=False))
        phases[name] = p.done()
    res = members["lightgbm"].result
    seq = members["sequence"].result if "sequence" in members else None
    assert all(np.isfinite(m.oof).all() and np.isfinite(m.test).all() for m in members.values())
    p = Phase()
    weights, oof_blend = blend_members(y, folds, members)
    phases["blend"] = p.done()
    t3, c3, m3 = time.perf_counter(), cpu_s(), machine_busy_s()
    labels = pd.read_parquet(folder / "test_labels.parquet").set_index("image_id")
    y_test = labels.loc[test["image_id"], list(LABELS)].to_numpy(np.float64)
    test_of = {n: m.test for n, m in members.items()}
    test_of["blend"] = blend.apply(weights, {n: m.test for n, m in members.items()})
    test_of["stage one"] = np.mean([np.mean([v.probs[e] for v in feats.tests.values()], axis=0)
                                    for e in cfg.experiments], axis=0)
    rounds = {label: [res.rounds[(label, k)] for k in range(N_FOLDS)] for label in LABELS}
    stage_one = np.mean(list(feats.probs.values()), axis=0)
    seq_phase = phases.get("sequence", {"s": 0.0, "cpu": 0.0})
    return {"train_rows": len(train), "test_rows": len(test), "features": n_features,
            "t_features": phases["features"]["s"], "t_boost": phases["lightgbm"]["s"],
            "t_sequence": seq_phase["s"] + phases["blend"]["s"], "t_total": t3 - t0,
            "cpu_features": phases["features"]["cpu"], "cpu_boost": phases["lightgbm"]["cpu"],
            "cpu_sequence": seq_phase["cpu"] + phases["blend"]["cpu"],
            "other_load": max(0.0, (m3 - m0 - (c3 - c0)) / (t3 - t0)),  # cores used by other processes meanwhile
            "rss_inputs_gb": rss_inputs, "phases": phases,
            "peak_gb": max([rss_inputs] + [ph["peak_gb"] for ph in phases.values()]),
            "rounds": rounds, "rounds_trained": sum(c.size for c in res.curves.values()),
            "any_prevalence": float(y[:, 5].mean()),
            "wll_stage_one": weighted_log_loss(y, stage_one), "wll_stage_two": weighted_log_loss(y, res.oof),
            "wll_optimistic": weighted_log_loss(y, res.oof_optimistic),
            "wll_sequence": weighted_log_loss(y, seq.oof) if seq else None,
            "wll_blend": weighted_log_loss(y, oof_blend) if seq else None,
            "test": {n: weighted_log_loss(y_test, p) for n, p in test_of.items()},
            "sequence_weights": weights[1].round(2).tolist() if seq else None,
            "sequence_epochs": [int(seq.epochs[k]) for k in sorted(seq.epochs)] if seq else None,
            "lgb_params": cfg.lgb_params, "num_boost_round": cfg.num_boost_round,
            "start_from_stage_one": cfg.start_from_stage_one, "k": args.k,
            "early_stopping_rounds": cfg.early_stopping_rounds}


# --- main ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="0.125,0.25,0.5,1", help="fractions of the full data (whole patients)")
    ap.add_argument("--experiments", type=int, default=2, help="stage-one experiments stacked")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=None, help="neighbors each side (default: the config's k_neighbors)")
    ap.add_argument("--pca", type=int, default=None, help="PCA components per experiment (default: the config's)")
    ap.add_argument("--emb-dim", type=int, default=64, help="width of the generated embeddings")
    ap.add_argument("--phi", type=float, default=0.9,
                    help="correlation of stage one's slice noise between neighbouring slices (0: independent)")
    ap.add_argument("--config", default=str(REPO / "configs" / "predict" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field or a LightGBM param, e.g. --set learning_rate=0.1 (repeatable)")
    ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "inherit"],
                    help="OMP_WAIT_POLICY of the timed children (default passive: idle OpenMP threads sleep "
                         "instead of spinning, which costs nothing on an idle machine and keeps LightGBM from "
                         "slowing down 5x when another process shares the cores; inherit: leave it as it is)")
    ap.add_argument("--train-rows", type=int, default=N_TRAIN, help="train slices at scale 1 (the competition's)")
    ap.add_argument("--test-rows", type=int, default=N_TEST, help="test slices at scale 1 (smaller: a quick check)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from stacking.config import apply_overrides, load_predict_config
    cfg = apply_overrides(load_predict_config(args.config), args.set)
    args.k = cfg.k_neighbors if args.k is None else args.k
    args.pca = cfg.pca_components if args.pca is None else args.pca
    if args.pca and not args.emb_dim:
        args.pca = 0
    args.emb_dim = min(args.emb_dim, 10_000)

    if args.child:
        print("RESULT " + json.dumps(child(Path(args.child), args)), flush=True)
        return

    scales = sorted(float(s) for s in args.scales.split(","))
    t = time.perf_counter()
    print(f"generating {args.train_rows:,} train + {args.test_rows:,} test slices, "
          f"{args.experiments} stage-one experiments (embeddings {args.emb_dim}-d) ...", flush=True)
    train, test = generate(args.seed, args.experiments, args.emb_dim if args.pca else 0,
                           args.train_rows, args.test_rows, args.phi)
    print(f"  done in {time.perf_counter() - t:.0f} s; any {train['table']['any'].mean():.1%}, "
          + ", ".join(f"{c[:4]} {train['table'][c].mean():.2%}" for c in SUBTYPES)
          + f"; {train['table']['series_id'].nunique():,} train series of "
          f"{train['table']['patient_id'].nunique():,} patients", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_stacking_") as tmp:
        for s in scales:
            write_scale(Path(tmp) / f"scale_{s}", train, test, patient_subset(train["table"], s, args.seed),
                        patient_subset(test["table"], s, args.seed), experiment_names(cfg, args.experiments))
        del train, test
        print(f"\nconfig {Path(args.config).name}" + (f" with {', '.join(args.set)}" if args.set else "")
              + f": k {args.k} (neighbors of {cfg.neighbors}), PCA {args.pca}, "
              f"start from stage one {cfg.start_from_stage_one}, "
              f"rounds {cfg.num_boost_round}, early stop {cfg.early_stopping_rounds}, lgb {json.dumps(cfg.lgb_params)}")
        policy = (os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit"
                  else args.omp_wait_policy.upper())
        print("wall seconds (CPU seconds of the process in brackets); 'other' = cores busy with other processes "
              f"meanwhile; OMP_WAIT_POLICY {policy}\n")
        print(f"{'scale':>6s} {'train':>9s} {'test':>8s} {'feat':>4s} {'features s':>13s} {'boosting s':>16s} "
              f"{'sequence s':>16s} {'total s':>8s} {'other':>5s} {'inputs GB':>9s} {'peak GB':>7s}  "
              f"{'wll 1 -> lgb (optimistic)':>27s} {'seq':>6s} {'blend':>6s}  rounds per label (mean of folds)",
              flush=True)
        for s in scales:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(Path(tmp) / f"scale_{s}"),
                   "--experiments", str(args.experiments), "--k", str(args.k), "--pca", str(args.pca),
                   "--emb-dim", str(args.emb_dim), "--config", args.config] + [f"--set={x}" for x in args.set]
            env = dict(os.environ)
            if args.omp_wait_policy != "inherit":
                env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=False, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"scale {s}: child failed (exit {out.returncode})\n{out.stdout[-3000:]}")
            r = results[s] = json.loads(line[-1][7:])
            iters = " ".join(f"{lab[:4]} {np.mean(v):.0f}" for lab, v in r["rounds"].items())
            opt = lambda v: f"{v:6.4f}" if v is not None else f"{'-':>6s}"  # noqa: E731
            print(f"{s:6.3f} {r['train_rows']:9,d} {r['test_rows']:8,d} {r['features']:4d} "
                  f"{r['t_features']:6.1f} ({r['cpu_features']:4.0f}) {r['t_boost']:7.1f} ({r['cpu_boost']:6.0f}) "
                  f"{r['t_sequence']:7.1f} ({r['cpu_sequence']:6.0f}) "
                  f"{r['t_total']:8.1f} {r['other_load']:5.2f} {r['rss_inputs_gb']:9.2f} {r['peak_gb']:7.2f}  "
                  f"{r['wll_stage_one']:.4f} -> {r['wll_stage_two']:.4f} ({r['wll_optimistic']:.4f}) "
                  f"{opt(r['wll_sequence'])} {opt(r['wll_blend'])}  {iters}"
                  + (f"; sequence epochs {r['sequence_epochs']}" if r["sequence_epochs"] else ""), flush=True)
            print("       phases (wall s / RSS peak GB / other processes' busy cores): " + ", ".join(
                f"{n} {ph['s']:.1f} s / {ph['peak_gb']:.2f} GB / {ph['other']:.2f}" for n, ph in r["phases"].items()),
                flush=True)
            print("       test: " + ", ".join(f"{n} {v:.4f}" for n, v in r["test"].items())
                  + (f"; sequence blend weights {r['sequence_weights']}" if r["sequence_weights"] else ""), flush=True)

    lo, hi = results[scales[0]], results[scales[-1]]
    if len(scales) > 1:
        rows = hi["train_rows"] / lo["train_rows"]
        print(f"\ngrowth {scales[0]:g} -> {scales[-1]:g}: rows x{rows:.1f}, "
              f"features x{hi['t_features'] / lo['t_features']:.1f}, "
              f"boosting x{hi['t_boost'] / lo['t_boost']:.1f}, total x{hi['t_total'] / lo['t_total']:.1f} "
              f"(exponent {math.log(hi['t_total'] / lo['t_total']) / math.log(rows):.2f}; 1.0 = linear), "
              f"peak x{hi['peak_gb'] / lo['peak_gb']:.1f}")
        for s in scales:
            r = results[s]
            n_iter = r["rounds_trained"]
            print(f"  scale {s:g}: {n_iter:,} boosting rounds in all (6 labels x 5 folds in lockstep), "
                  f"{1000 * r['t_boost'] / n_iter:.0f} ms per round")
    if scales[-1] == 1 and (args.train_rows, args.test_rows) == (N_TRAIN, N_TEST):
        ok_t, ok_m = hi["t_total"] <= 1200, hi["peak_gb"] <= 6
        print(f"full scale: {hi['t_total'] / 60:.1f} min (target <= 20 min: {'met' if ok_t else 'MISSED'}), "
              f"peak {hi['peak_gb']:.2f} GB (target <= 6 GB: {'met' if ok_m else 'MISSED'}); per phase: "
              + ", ".join(f"{n} {ph['s'] / 60:.1f} min / {ph['peak_gb']:.2f} GB" for n, ph in hi["phases"].items()))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; lightgbm {__import__('lightgbm').__version__}")


if __name__ == "__main__":
    main()
