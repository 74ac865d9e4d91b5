#!/usr/bin/env python
"""The demo: the whole pipeline, as far as it is built, on generated data, on CPU.

Each step is the real entry point, run as a user would run it, and printed
first so the demo doubles as a tutorial. Outputs go under data/demo/ (see
SETTINGS.demo.json); a rerun reuses what is already there.
"""
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PY = sys.executable
SETTINGS = "SETTINGS.demo.json"
RAW = ROOT / "data" / "demo" / "raw"

STEPS = [
    ("Generate a synthetic dataset in Kaggle's layout (skipped when present)",
     [PY, "-m", "synthetic", "--out", str(RAW.relative_to(ROOT)), "--train-patients", "40",
      "--test-patients", "10", "--size", "256", "--seed", "0", "--jobs", "2"]),
    ("Prepare: DICOM -> slices.parquet + image cache",
     [PY, "prepare_data.py", "--settings", SETTINGS, "--config", "configs/prepare/demo.yaml"]),
    ("Stage one: 5-fold CNN (tiny, CPU) -> checkpoints, out-of-fold probabilities and embeddings",
     [PY, "train.py", "--settings", SETTINGS, "--config", "configs/demo_cpu.yaml", "--resume"]),
    ("Predict: stage one on test, stage two (neighbor-slice LightGBM), submission.csv",
     [PY, "predict.py", "--settings", SETTINGS, "--config", "configs/predict/demo.yaml"]),
    ("Report: one HTML page with the data, curves, per-label scores, calibration and Grad-CAM",
     [PY, "report.py", "--settings", SETTINGS, "--config", "configs/predict/demo.yaml"]),
]


STUDY_ZIP = ROOT / "data" / "demo" / "study_demo.zip"


def write_demo_study(path: Path = STUDY_ZIP) -> Path:
    """One generated test study as a zip, to upload in the web app: the test series with the most bleeding
    slices (the generated test labels say which), in a PACS-like layout."""
    import zipfile

    import pandas as pd

    from ich.labels import read_labels

    slices = pd.read_parquet(ROOT / "data" / "demo" / "clean" / "test" / "slices.parquet")
    labels = read_labels(RAW / "stage_2_test_labels.csv")
    bleeding = slices.assign(any=slices["image_id"].map(labels["any"])).groupby("series_id")["any"].sum()
    series = bleeding.idxmax()
    ids = slices.loc[slices.series_id == series].sort_values("slice_index")["image_id"]
    with zipfile.ZipFile(path, "w") as z:
        for i, image_id in enumerate(ids):
            z.write(RAW / "stage_2_test" / f"{image_id}.dcm", f"DEMO_STUDY/CT_HEAD/IM{i:04d}.dcm")
    return path


def main():
    t0 = time.time()
    for i, (title, cmd) in enumerate(STEPS, 1):
        print(f"\n== {i}/{len(STEPS)} {title}\n$ {shlex.join(['python'] + cmd[1:])}", flush=True)
        if cmd[1:3] == ["-m", "synthetic"] and (RAW / "stage_2_train.csv").is_file():
            print(f"(already there: {RAW.relative_to(ROOT)}; delete it to regenerate)")
            continue
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode:
            sys.exit(f"demo: step {i} failed with exit code {result.returncode}")
    write_demo_study()
    print(f"\nDemo finished in {time.time() - t0:.0f} s. Outputs under data/demo/:")
    for path, what in [("clean/train/slices.parquet", "clean slice table (train)"),
                       ("clean/train/rejected.csv", "files that could not be used, with the reason"),
                       ("models/demo_cpu/oof.parquet", "stage-one out-of-fold probabilities"),
                       ("logs/demo_cpu/training_curves.png", "training curves per fold"),
                       ("logs/stacking/demo/metrics.csv", "log-loss table: prior, stage one, stage two"),
                       ("logs/stacking/demo/feature_importance.png", "stage-two feature importance"),
                       ("submissions/submission.csv", "the Kaggle submission"),
                       ("logs/report/report.html", "the report: open it in a browser"),
                       ("study_demo.zip", "one test study, to upload in the web app")]:
        print(f"  {what:48s} data/demo/{path}")
    print("\nThe web application on the demo model (one study in, probabilities per slice out; upload "
          "data/demo/study_demo.zip):\n  .venv/bin/python serve.py --settings SETTINGS.demo.json "
          "--config configs/predict/demo.yaml\n  then open http://127.0.0.1:8000/  (research use only)")


if __name__ == "__main__":
    main()
