#!/usr/bin/env python
"""Stage two on several generated sets: prior / stage one / LightGBM / sequence member / blend, honest OOF
and test, per config variant; "grid blend" is the blend as it was before the shrinkage and the nesting
(grid weights, cross-fitted on the members' honest OOF), for comparison.

A set is either a SETTINGS.json whose folders hold a finished stage one (prepare_data.py, train.py and
predict.py --stage1-only, which writes each fold model's test outputs) on a `python -m synthetic` set,
whose RAW_DATA_DIR/stage_2_test_labels.csv gives the test labels (--set-dir), or a generated stage-one
table (--table NAME:seed=S,rows=N,test=M,phi=F: benchmarks/stacking.py's generator, two experiments,
written once under data/sets/tables/NAME and reused). Stage two runs as stacking.run does
(`stage_two_features`, `fit_members`, `blend_members`), nothing is written; OOF scores are honest (rounds,
epochs and blend weights picked on other folds), test scores use the generated labels. Variants that
differ only in `sequence.*` keys share one LightGBM member per set (trained once), so comparing member
variants costs the member's time only. Each row also prints the member's seconds and, against the set's
first variant, the member's and the blend's OOF gain per fold (mean and fold-to-fold spread): the rule
for keeping a change is a gain larger than its spread.
The point: choose defaults on some sets (tuning sets), then report on sets never looked at before
(held-out sets), BENCHMARKS.md "Stage two on held-out sets".

    .venv/bin/python benchmarks/stage_two_sets.py --config configs/predict/demo.yaml \\
        --set-dir data/sets/demo --set-dir data/sets/h1 \\
        --variant base: --variant sign:pca_alignment=sign --variant nopca:pca_components=0
    .venv/bin/python benchmarks/stage_two_sets.py --config configs/predict/default.yaml \
        --table t0:seed=0,rows=30000,test=8000,phi=0.9 --set learning_rate=0.1 --set early_stopping_rounds=20 \
        --variant today: --variant diffs:sequence.diffs=true
"""
from __future__ import annotations

import argparse
import json
import resource
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


TABLE_DEFAULTS = {"seed": 0, "rows": 30000, "test": 8000, "phi": 0.9}


def parse_table(text: str) -> tuple[str, dict]:
    """NAME:seed=S,rows=N,test=M,phi=F -> (NAME, settings); missing keys from TABLE_DEFAULTS."""
    name, _, pairs = text.partition(":")
    spec = dict(TABLE_DEFAULTS)
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        if key not in spec:
            raise SystemExit(f"--table {text}: unknown key {key!r} (known: {', '.join(spec)})")
        spec[key] = float(value) if key == "phi" else int(value)
    return name, spec


def table_set(name: str, spec: dict, root: Path) -> Path:
    """A generated stage-one table (benchmarks/stacking.py's generator, two experiments named exp0/exp1,
    64-d embeddings), written once under root/NAME with the settings in spec.json and reused after."""
    folder = root / name
    if (folder / "spec.json").is_file():
        if json.loads((folder / "spec.json").read_text()) != spec:
            raise SystemExit(f"{folder} holds another table ({(folder / 'spec.json').read_text()}): pick another name")
        return folder
    import importlib.util
    import shutil
    spec_ = importlib.util.spec_from_file_location("bench_stacking", REPO / "benchmarks" / "stacking.py")
    bench = importlib.util.module_from_spec(spec_)  # benchmarks/stacking.py, the generator
    spec_.loader.exec_module(bench)
    shutil.rmtree(folder, ignore_errors=True)
    train, test = bench.generate(spec["seed"], 2, 64, spec["rows"], spec["test"], spec["phi"])
    everything = lambda t: np.ones(len(t["table"]), bool)  # noqa: E731
    bench.write_scale(folder, train, test, everything(train), everything(test), ["exp0", "exp1"])
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


def load_set(set_dir: Path, cfg):
    """(train slices, test slices, test labels (n_test, 6), the stage-one model dir) of a set; a table set
    names its experiments exp0/exp1 in cfg."""
    if (set_dir / "spec.json").is_file():
        cfg.experiments = ["exp0", "exp1"]
        train = pd.read_parquet(set_dir / "train_slices.parquet")
        test = pd.read_parquet(set_dir / "test_slices.parquet")
        labels = pd.read_parquet(set_dir / "test_labels.parquet").set_index("image_id")
        return train, test, labels.loc[test["image_id"], list(LABELS)].to_numpy(np.float64), set_dir / "models"
    from ich.settings import load_settings
    settings = load_settings(set_dir / "SETTINGS.json")
    train = pd.read_parquet(settings.train_clean_dir / "slices.parquet")
    test = pd.read_parquet(settings.test_clean_dir / "slices.parquet")
    labels = read_labels(settings.raw_data_dir / "stage_2_test_labels.csv")
    return (train, test, labels.loc[test["image_id"], list(LABELS)].to_numpy(np.float64),
            settings.model_checkpoint_dir)


def _stored(set_dir: Path, cfg) -> Path | None:
    """Where a table set keeps its LightGBM member's predictions for this config (everything but the
    sequence settings decides them): reused by later runs, so member variants cost the member only."""
    if not (set_dir / "spec.json").is_file():
        return None
    import dataclasses
    import hashlib
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("sequence", "members", "name")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return set_dir / "lightgbm_cache" / f"{digest}.npz"


def run_set(set_dir: Path, cfg, cache: dict | None = None, key=None, save: Path | None = None) -> dict:
    """Scores of one set under one config: {row: (honest OOF, test)}, and the blend weights.

    cache: members already trained on this set, by (key, member name); with a key (the variant's
    non-sequence overrides) LightGBM is taken from it when there, so sequence variants share it."""
    from stacking import blend
    from stacking.run import Member, blend_members, fit_members, stage_two_features

    train, test, y_test, model_dir = load_set(set_dir, cfg)
    y, folds = train[list(LABELS)].to_numpy(np.float64), train["fold"].to_numpy()
    cache = {} if cache is None else cache
    t0 = time.perf_counter()
    feats = stage_two_features(cfg, model_dir, train, test)
    members, names = {}, list(cfg.members)
    for name in names:
        if (key, name) not in cache or name != "lightgbm":
            stored = _stored(set_dir, cfg) if name == "lightgbm" else None
            if stored is not None and stored.is_file():
                with np.load(stored) as z:
                    cache[key, name] = Member(z["oof"], z["test"], z["oof_optimistic"], z["nested"], None,
                                              float(z["seconds"]))
            else:
                cfg.members = [name]
                m = cache[key, name] = fit_members(cfg, feats, train, test, y, folds, progress=False)[name]
                if stored is not None:
                    stored.parent.mkdir(exist_ok=True)
                    np.savez(stored, oof=m.oof, test=m.test, oof_optimistic=m.oof_optimistic, nested=m.nested,
                             seconds=m.seconds)
        members[name] = cache[key, name]
    cfg.members = names
    if save is not None:  # every member's predictions, to study the blend without training again
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez(save, y=y, folds=folds, y_test=y_test,
                 **{f"{n}_{what}": getattr(m, what) for n, m in members.items() for what in ("oof", "test", "nested")})
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
    seq = members.get("sequence")
    return {"scores": scores, "per_fold": per_fold,
            "weights": {n: weights[i].round(2).tolist() for i, n in enumerate(members)},
            "train_rows": len(train), "test_rows": len(test), "seconds": seconds,
            "member_seconds": {n: m.seconds for n, m in members.items()},
            "sequence_epochs": None if seq is None else [int(seq.result.epochs[k]) for k in sorted(seq.result.epochs)],
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


ROWS = ("prior", "stage one", "lightgbm", "sequence", "blend", "grid blend")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "predict" / "demo.yaml"))
    ap.add_argument("--set-dir", action="append", default=[], help="a folder with SETTINGS.json (repeatable)")
    ap.add_argument("--table", action="append", default=[], metavar="NAME:seed=S,rows=N,test=M,phi=F",
                    help="a generated stage-one table, written once under --tables (repeatable)")
    ap.add_argument("--tables", default=str(REPO / "data" / "sets" / "tables"), help="where tables are written")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides for every variant (as benchmarks/stacking.py --set)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                    help="config overrides as benchmarks/stacking.py --set takes them (repeatable; default: the "
                         "config as it is)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the member's own setting overrides)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--save", default=None, help="a folder: each member's OOF, nested and test predictions per "
                                                 "set and variant (SET/VARIANT.npz)")
    args = ap.parse_args()
    from stacking.config import apply_overrides, load_predict_config

    import torch
    torch.set_num_threads(args.threads)
    sets = [Path(d) for d in args.set_dir] + [table_set(*parse_table(t), Path(args.tables)) for t in args.table]
    if not sets:
        ap.error("give at least one --set-dir or --table")
    results = []
    print("| set | variant | rows train/test | " + " | ".join(f"{r} OOF / test" for r in ROWS)
          + " | blend weights (sequence, per label) | member s | s |", flush=True)
    for set_dir in sets:
        cache = {}
        for name, pairs in map(parse_variant, args.variant or ["default:"]):
            cfg = apply_overrides(load_predict_config(args.config), args.set + pairs)
            key = tuple(p for p in pairs if not p.startswith("sequence."))
            save = None if args.save is None else Path(args.save) / set_dir.name / f"{name}.npz"
            r = run_set(set_dir, cfg, cache, key, save)
            r.update(set=set_dir.name, variant=name)
            first = next((x for x in results if x["set"] == r["set"]), None)
            results.append(r)
            cell = lambda k: "{:.4f} / {:.4f}".format(*r["scores"][k]) if k in r["scores"] else "-"  # noqa: E731
            print(f"| {r['set']} | {name} | {r['train_rows']}/{r['test_rows']} | "
                  + " | ".join(cell(k) for k in ROWS)
                  + f" | {r['weights'].get('sequence', '-')} | {r['member_seconds'].get('sequence', 0):.0f} "
                  f"| {r['seconds']:.0f} |", flush=True)
            if r["sequence_epochs"]:
                print(f"|   | {name}: sequence epochs {r['sequence_epochs']}, peak {r['peak_gb']:.2f} GB |", flush=True)
            if first is not None:  # against the set's first variant: OOF gain per fold (+: better)
                for row in ("lightgbm", "sequence", "blend"):
                    if row in r["per_fold"] and row in first["per_fold"]:
                        gain = np.subtract(first["per_fold"][row], r["per_fold"][row])
                        print(f"|   | {name} vs {first['variant']}: {row} OOF gain per fold "
                              f"{np.round(gain, 4).tolist()}, mean {gain.mean():+.4f}, spread (std) "
                              f"{gain.std(ddof=1):.4f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
