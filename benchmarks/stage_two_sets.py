#!/usr/bin/env python
"""Stage two on several generated sets: prior / stage one / LightGBM / sequence member / blend, honest OOF
and test, per config variant; "grid blend" is the blend as it was before the shrinkage and the nesting
(grid weights, cross-fitted on the members' honest OOF), for comparison.

Each set is a SETTINGS.json whose folders hold a finished stage one (prepare_data.py, train.py and
predict.py --stage1-only, which writes each fold model's test outputs) on a `python -m synthetic` set,
whose RAW_DATA_DIR/stage_2_test_labels.csv gives the test labels. Stage two runs as stacking.run does
(`stage_two_features`, `fit_members`, `blend_members`), nothing is written; OOF scores are honest (rounds,
epochs and blend weights picked on other folds), test scores use the generated labels.
The point: choose defaults on some sets (tuning sets), then report on sets never looked at before
(held-out sets), BENCHMARKS.md "Stage two on held-out sets".

    .venv/bin/python benchmarks/stage_two_sets.py --config configs/predict/demo.yaml \\
        --set-dir data/sets/demo --set-dir data/sets/h1 \\
        --variant base: --variant sign:pca_alignment=sign --variant nopca:pca_components=0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ich.labels import LABELS, read_labels  # noqa: E402
from ich.metric import weighted_log_loss  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, pairs = text.partition(":")
    return name, [p for p in pairs.split(",") if p]


def run_set(set_dir: Path, cfg) -> dict:
    """Scores of one set under one config: {row: (honest OOF, test)}, and the blend weights."""
    from ich.settings import load_settings
    from stacking import blend
    from stacking.run import blend_members, fit_members, stage_two_features

    settings = load_settings(set_dir / "SETTINGS.json")
    train = pd.read_parquet(settings.train_clean_dir / "slices.parquet")
    test = pd.read_parquet(settings.test_clean_dir / "slices.parquet")
    labels = read_labels(settings.raw_data_dir / "stage_2_test_labels.csv")
    y_test = labels.loc[test["image_id"], list(LABELS)].to_numpy(np.float64)
    y, folds = train[list(LABELS)].to_numpy(np.float64), train["fold"].to_numpy()
    t0 = time.perf_counter()
    feats = stage_two_features(cfg, settings.model_checkpoint_dir, train, test)
    members = fit_members(cfg, feats, train, test, y, folds, progress=False)
    weights, oof_blend = blend_members(y, folds, members)
    seconds = time.perf_counter() - t0
    test_blend = blend.apply(weights, {n: m.test for n, m in members.items()})
    prior = y.mean(axis=0)
    stage_one_test = np.mean([np.mean([v.probs[e] for v in feats.tests.values()], axis=0) for e in cfg.experiments],
                             axis=0)
    rows = {"prior": (np.broadcast_to(prior, y.shape), np.broadcast_to(prior, y_test.shape)),
            "stage one": (np.mean(list(feats.probs.values()), axis=0), stage_one_test)}
    rows.update({name: (m.oof, m.test) for name, m in members.items()})
    if len(members) > 1:
        rows["blend"] = (oof_blend, test_blend)
        oof = {n: m.oof for n, m in members.items()}  # the blend before: grid weights, first-order cross-fit
        rows["grid blend"] = (blend.cross_fit(y, folds, oof)[0],
                              blend.apply(blend.fit_weights(y, oof), {n: m.test for n, m in members.items()}))
    scores = {name: (weighted_log_loss(y, o), weighted_log_loss(y_test, t)) for name, (o, t) in rows.items()}
    per_fold = {name: [weighted_log_loss(y[folds == k], o[folds == k]) for k in np.unique(folds)]
                for name, (o, _) in rows.items()}
    return {"scores": scores, "per_fold": per_fold, "weights": {n: weights[i].round(2).tolist() for i, n in enumerate(members)},
            "train_rows": len(train), "test_rows": len(test), "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "predict" / "demo.yaml"))
    ap.add_argument("--set-dir", action="append", required=True, help="a folder with SETTINGS.json (repeatable)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                    help="config overrides as benchmarks/stacking.py --set takes them (repeatable; default: the "
                         "config as it is)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from stacking.config import apply_overrides, load_predict_config

    import torch
    torch.set_num_threads(1)
    results = []
    print("| set | variant | rows train/test | " + " | ".join(
        f"{r} OOF / test" for r in ("prior", "stage one", "lightgbm", "sequence", "blend", "grid blend")) + " | blend weights "
          "(sequence, per label) | s |", flush=True)
    for set_dir in args.set_dir:
        for name, pairs in map(parse_variant, args.variant or ["default:"]):
            cfg = apply_overrides(load_predict_config(args.config), pairs)
            r = run_set(Path(set_dir), cfg)
            r.update(set=Path(set_dir).name, variant=name)
            first = next((x for x in results if x["set"] == r["set"]), None)
            results.append(r)
            cell = lambda k: "{:.4f} / {:.4f}".format(*r["scores"][k]) if k in r["scores"] else "-"  # noqa: E731
            print(f"| {r['set']} | {name} | {r['train_rows']}/{r['test_rows']} | "
                  + " | ".join(cell(k) for k in ("prior", "stage one", "lightgbm", "sequence", "blend", "grid blend"))
                  + f" | {r['weights'].get('sequence', '-')} | {r['seconds']:.0f} |", flush=True)
            if first is not None:  # against the set's first variant: LightGBM's OOF gain per fold
                gain = np.subtract(first["per_fold"]["lightgbm"], r["per_fold"]["lightgbm"])
                print(f"|   | {name} vs {first['variant']}: LightGBM OOF gain per fold {np.round(gain, 4).tolist()}, "
                      f"mean {gain.mean():+.4f}, spread (std) {gain.std(ddof=1):.4f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
