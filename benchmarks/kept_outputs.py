#!/usr/bin/env python
"""The disk stage one's test outputs take, keeping embeddings or only stage two's PCA scores.

Streams generated stage-one outputs of one experiment (--rows test slices,
--dim-wide float16 embeddings as the engine hands them over, 5 fold models,
batches of --batch rows) through pipeline.batch.StreamSink and
ich.stage_one.write_outputs, once per road:

  embeddings : test_fold{k}_emb.npy (float16), what `pca_alignment:
               procrustes` or `test_embeddings: true` keep;
  scores     : each batch through fold model k's PCA (stacking.pca.
               fit_signed_pca on generated OOF embeddings, --width
               components: the config's pca_width) -> test_fold{k}_pcs.npy
               (float32) + test_pca.joblib, the default;

and prints the bytes of every test_* file written per road, the sink's
seconds, and the projection to the competition's test set (121,232 slices x
3 experiments x 5 fold models), bytes per slice and fold model being
constant (.npy rows plus a 128-byte header; the parquet and joblib files
are measured and scaled by rows).

    .venv/bin/python benchmarks/kept_outputs.py [--rows 20000] [--dim 2048] [--width 8] [--batch 128]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ich import stage_one as files  # noqa: E402
from ich.labels import LABELS  # noqa: E402
from pipeline.batch import StreamSink  # noqa: E402
from stacking.pca import fit_signed_pca  # noqa: E402

N_TEST, N_EXPERIMENTS, N_FOLDS = 121_232, 3, 5


def road(exp_dir: Path, kind: str, rows: int, dim: int, batch: int, pcas: dict | None, seed: int) -> tuple[dict, float]:
    exp_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sink = StreamSink({("e", k): files.fold_test_part(exp_dir, k, kind) for k in range(N_FOLDS)},
                      pcas if kind == "scores" else None)
    probs = {k: rng.random((rows, len(LABELS)), dtype=np.float32) for k in range(N_FOLDS)}
    emb = {k: rng.normal(0, 1, (rows, dim)).astype(np.float16) for k in range(N_FOLDS)}
    t = time.perf_counter()
    for start in range(0, rows, batch):
        for k in range(N_FOLDS):
            sink.add_outputs(("e", k), probs[k][start:start + batch], emb[k][start:start + batch])
    sink.close()
    seconds = time.perf_counter() - t
    kept = {"pca_width": next(iter(pcas.values())).rotation.shape[1]} if kind == "scores" else "embeddings"
    outputs = sink.outputs()
    files.write_outputs(exp_dir, files.outputs_key("cache", {}, {}, rows, "x", kept),
                        [f"ID_{i:09x}" for i in range(rows)], {k: outputs["e", k][0] for k in range(N_FOLDS)},
                        {k: sink.finish(("e", k), rows) for k in range(N_FOLDS)},
                        {"spec": kept, "models": {k: pcas["e", k] for k in range(N_FOLDS)}}
                        if kind == "scores" else None)
    return {p.name: p.stat().st_size for p in sorted(exp_dir.iterdir()) if p.name.startswith("test")}, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="test slices")
    ap.add_argument("--dim", type=int, default=2048,
                    help="embedding width (2,048: the shipped ResNeXts' pooled features)")
    ap.add_argument("--width", type=int, default=8, help="PCA scores kept per fold model (the config's pca_width)")
    ap.add_argument("--batch", type=int, default=128, help="rows per engine batch (configs/predict/default.yaml)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pcas = {}
    for k in range(N_FOLDS):
        oof = rng.normal(0, 1, (4000, args.dim)).astype(np.float16).astype(np.float32)
        pcas["e", k] = fit_signed_pca(oof, oof[:, 0], args.width)
    out = {}
    with tempfile.TemporaryDirectory(prefix="kept_outputs_") as tmp:
        for i, kind in enumerate(("embeddings", "scores")):
            out[kind] = road(Path(tmp) / kind, kind, args.rows, args.dim, args.batch, pcas, i)
    print(f"{args.rows:,} test slices x {N_FOLDS} fold models of one experiment, {args.dim}-d embeddings, "
          f"PCA width {args.width}, batches of {args.batch}")
    per_row = N_TEST / args.rows * N_EXPERIMENTS  # .npy rows and parquet tables grow with the slices
    projected = {}
    for kind, (sizes, seconds) in out.items():
        rows_files = sum(v for n, v in sizes.items() if n.endswith(".npy"))
        tables = sum(v for n, v in sizes.items() if n.endswith(".parquet"))
        fixed = sum(v for n, v in sizes.items() if n.endswith((".json", ".joblib")))
        projected[kind] = rows_files * per_row + tables * per_row + fixed * N_EXPERIMENTS
        print(f"\n{kind}: {sum(sizes.values()) / 2 ** 20:,.1f} MiB written, sink {seconds:.1f} s "
              f"({1e6 * seconds / (args.rows * N_FOLDS):.1f} us per slice and fold model)")
        for name, size in sizes.items():
            print(f"  {name:24s} {size:>14,d} B")
        print(f"  projected to {N_TEST:,} test slices x {N_EXPERIMENTS} experiments x {N_FOLDS} fold models: "
              f"{'embeddings' if kind == 'embeddings' else 'scores'} .npy {rows_files * per_row / 2 ** 30:,.3f} GiB, "
              f"probability tables {tables * per_row / 2 ** 30:,.3f} GiB (both roads), key / PCAs "
              f"{fixed * N_EXPERIMENTS / 2 ** 20:,.1f} MiB; all {projected[kind] / 2 ** 30:,.3f} GiB")
    print(f"\nthe kernel's stage-one test outputs: {projected['embeddings'] / 2 ** 30:,.2f} GiB keeping embeddings, "
          f"{projected['scores'] / 2 ** 30:,.3f} GiB keeping scores "
          f"({projected['embeddings'] / projected['scores']:,.0f}x less)")


if __name__ == "__main__":
    main()
