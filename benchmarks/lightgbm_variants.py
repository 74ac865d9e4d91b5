#!/usr/bin/env python
"""Stage two's LightGBM member alone, per settings variant, on generated stage-one tables: what the boosting
costs (wall and CPU seconds, rounds trained) against what it scores (honest OOF, test, per-fold gain).

The tables are benchmarks/stage_two_sets.py's (`--table NAME:seed=S,rows=N,test=M,phi=F`, written once
under data/sets/tables and reused); the features are built as stacking.run builds them, then
stacking.run.fit_members with `members: [lightgbm]`. Each line: wall and CPU seconds of the boosting (CPU
seconds are the measure on a shared machine: LightGBM's threads wait passively, OMP_WAIT_POLICY=PASSIVE
is set here), the rounds trained over the 6 labels (the lockstep trains until every honest and nested
pick has stopped, stacking.model) and the honest picks' mean, the honest OOF and test weighted log loss,
and the OOF gain per fold against the table's first variant (mean, sd: the rule for keeping a change is
a gain larger than its spread).

    .venv/bin/python benchmarks/lightgbm_variants.py --table t8a:seed=0,rows=94100,test=15000,phi=0.9 \
        --variant before:early_stopping_rounds=20,feature_fraction=0.5 --variant now: \
        --variant goss:data_sample_strategy=goss,bagging_fraction=1.0,bagging_freq=0
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before LightGBM loads OpenMP

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import stage_two_sets  # noqa: E402
from ich.labels import LABELS  # noqa: E402
from ich.metric import weighted_log_loss  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_variant(set_dir: Path, config: str, pairs: list[str]) -> dict:
    """One LightGBM member on one table: seconds, rounds and scores."""
    from stacking.config import apply_overrides, load_predict_config
    from stacking.run import fit_members, stage_two_features

    cfg = apply_overrides(load_predict_config(config), pairs + ["members=[lightgbm]"])
    train, test, y_test, model_dir = stage_two_sets.load_set(set_dir, cfg)
    y, folds = train[list(LABELS)].to_numpy(np.float64), train["fold"].to_numpy()
    feats = stage_two_features(cfg, model_dir, train, test)
    t0, c0 = time.perf_counter(), cpu_seconds()
    m = fit_members(cfg, feats, train, test, y, folds, progress=False)["lightgbm"]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall": wall, "cpu": cpu, "features": len(feats.names),
            "rounds": sum(c.shape[1] for c in m.result.curves.values()),
            "honest": float(np.mean(list(m.result.rounds.values()))),
            "oof": weighted_log_loss(y, m.oof), "test": weighted_log_loss(y_test, m.test),
            "per_fold": np.array([weighted_log_loss(y[folds == k], m.oof[folds == k]) for k in np.unique(folds)])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "predict" / "default.yaml"))
    ap.add_argument("--table", action="append", required=True, metavar="NAME:seed=S,rows=N,test=M,phi=F")
    ap.add_argument("--tables", default=str(REPO / "data" / "sets" / "tables"), help="where tables are written")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                    help="config overrides (repeatable; default: the config as it is)")
    args = ap.parse_args()
    for text in args.table:
        set_dir = stage_two_sets.table_set(*stage_two_sets.parse_table(text), Path(args.tables))
        first = None
        for name, pairs in map(stage_two_sets.parse_variant, args.variant or ["default:"]):
            r = run_variant(set_dir, args.config, args.set + pairs)
            line = (f"{set_dir.name} {name}: wall {r['wall']:.0f} s, CPU {r['cpu']:.0f} s, rounds trained "
                    f"{r['rounds']} (honest mean {r['honest']:.0f}), honest OOF {r['oof']:.5f}, test {r['test']:.5f}")
            if first is None:
                first = r
            else:
                gain = first["per_fold"] - r["per_fold"]
                line += (f"; OOF gain per fold vs {args.variant[0].split(':')[0] if args.variant else 'first'} "
                         f"{np.round(gain, 5).tolist()}, mean {gain.mean():+.5f}, sd {gain.std(ddof=1):.5f}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
