"""``python -m synthetic --out DIR``: write a synthetic dataset and print its summary."""
from __future__ import annotations

import argparse
import sys

from ich.labels import LABELS

from .generate import generate_dataset


def format_summary(s: dict) -> str:
    """The summary dict as a short, aligned table for a terminal."""
    lines = [
        f"synthetic RSNA-ICH dataset in {s['out_dir']}  ({s['seconds']:.1f} s)",
        f"  patients {s['patients']} (train {s['train_patients']}, test {s['test_patients']}), "
        f"studies {s['studies']}, series {s['series']}",
        f"  images   train {s['train_images']}, test {s['test_images']}  "
        f"(12-bit quirk {s['bits12_files']}, corrupt {s['corrupt_files']}, "
        f"duplicated csv rows {s['duplicate_rows']})",
        "",
        f"  {'label (train)':<18}{'positives':>10}{'prevalence':>12}",
    ]
    for label in LABELS:
        lines.append(f"  {label:<18}{s['positives'][label]:>10}{s['prevalence'][label]:>11.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthetic", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--train-patients", type=int, default=30)
    p.add_argument("--test-patients", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="image rows = columns (real data: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (per series)")
    p.add_argument("--corrupt", type=int, default=1, help="train files truncated in their pixel data")
    p.add_argument("--min-slices", type=int, default=20,
                   help="shortest series (real data: about 20); longer series: e.g. 40 gives 40-60 slices")
    p.add_argument("--dicom-uids", action="store_true",
                   help="headers a PACS accepts (valid UIDs and the SOP Class UID) instead of Kaggle's ID_ UIDs; "
                        "for sending to a PACS or the DICOM node, not for prepare_data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    summary = generate_dataset(a.out, n_train_patients=a.train_patients, n_test_patients=a.test_patients,
                               image_size=a.size, seed=a.seed, n_jobs=a.jobs, n_corrupt=a.corrupt,
                               progress=not a.quiet, min_slices=a.min_slices,
                               dicom_uids=a.dicom_uids)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
