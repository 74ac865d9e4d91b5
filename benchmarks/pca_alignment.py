#!/usr/bin/env python
"""Do the stage-one fold models' PCA components mean the same thing? Before and after alignment.

For each experiment of a predict config, on the test images every fold
model has scored (test_fold{k}_emb.npy), the correlation of component i of
fold model j with component i of fold model k, for every pair (j, k):
with each fold model's own PCA, each component's sign fixed by the model's
`any` logit (before the sequence member), and the components stage two now uses
(stacking.run.load_stage_one: Procrustes alignment of the fold models'
wider PCAs, then components they share, `common_components`). Prints the
worst pair per component.

    .venv/bin/python benchmarks/pca_alignment.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml

It reads the test embeddings, which predict.py keeps only with
`pca_alignment: procrustes` or `test_embeddings: true` in the predict config
(by default it keeps their PCA scores): run predict.py with one of those first.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ich.settings import load_settings  # noqa: E402
from stacking.config import load_predict_config  # noqa: E402
from stacking.pca import fit_signed_pca  # noqa: E402
from stacking.stage_one import ANY, _aligned, _embeddings, _test_fold_path, load_stage_one  # noqa: E402
from stacking.model import logit  # noqa: E402


def worst(scores: dict[int, np.ndarray]) -> np.ndarray:
    """Per component, the lowest correlation over all pairs of fold models."""
    n = next(iter(scores.values())).shape[1]
    return np.array([min(np.corrcoef(scores[j][:, i], scores[k][:, i])[0, 1]
                         for j, k in itertools.combinations(sorted(scores), 2)) for i in range(n)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.json")
    ap.add_argument("--config", default="configs/predict/default.yaml")
    args = ap.parse_args()
    settings, cfg = load_settings(args.settings), load_predict_config(args.config)
    cfg.pca_alignment = "procrustes"  # the alignment is what this shows, whatever the config uses
    if not cfg.pca_components:
        sys.exit(f"{args.config} has pca_components: 0; nothing to align")
    train = pd.read_parquet(settings.train_clean_dir / "slices.parquet")
    test = pd.read_parquet(settings.test_clean_dir / "slices.parquet")
    folds = train["fold"].to_numpy()
    _, views = load_stage_one(cfg, settings.model_checkpoint_dir, train, test)
    for exp in cfg.experiments:
        d = settings.model_checkpoint_dir / exp
        probs, rows, n_oof = _aligned(d / "oof.parquet", train["image_id"], "train stage-one")
        signed = {}
        for k in sorted(int(f) for f in np.unique(folds)):
            held = np.flatnonzero(folds == k)
            pca = fit_signed_pca(_embeddings(d / "oof_emb.npy", rows[held], n_oof), logit(probs[held, ANY]),
                                 cfg.pca_components)
            _, r, n = _aligned(_test_fold_path(d, k), test["image_id"], "test")
            signed[k] = pca.transform(_embeddings(_test_fold_path(d, k, emb=True), r, n))
        aligned = {k: view.pcs[exp] for k, view in views.items()}
        print(f"{exp}: {len(test)} test images, {len(signed)} fold models, {cfg.pca_components} components; "
              "worst correlation of component i between two fold models")
        print(f"  {'component':>9s} " + " ".join(f"{i:>6d}" for i in range(cfg.pca_components)))
        print(f"  {'signs':>9s} " + " ".join(f"{v:6.2f}" for v in worst(signed)))
        print(f"  {'aligned':>9s} " + " ".join(f"{v:6.2f}" for v in worst(aligned)))


if __name__ == "__main__":
    main()
