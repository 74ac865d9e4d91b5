"""One study -> per-slice probabilities of the six labels, by the batch path's own code.

ich.study picks the study's axial CT series and gives every other file a
reason. Its slices are then laid out as a one-study Kaggle test split in a
temporary folder and go through exactly what predict.py runs on the test
set: ich.prepare.prepare_split (same DICOM reading, HU, windows, cache,
with the train cache's image settings), models.predict_split (every fold
model of every experiment of the predict config) and stacking.apply (the
boosters predict.py trained, with their saved PCAs). Nothing of the study
is kept: the temporary folder goes when the call returns, on error too.
Outputs (`write_outputs`): a per-slice CSV, the same rows in Kaggle's
`ID_<image>_<label>` form, and a JSON with the skipped files and the model.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from ich.cache import read_meta, write_atomic
from ich.config import PrepareConfig, cache_settings, prepare_config_from
from ich.labels import LABELS
from ich.prepare import prepare_split
from ich.study import StudyError, choose_series, study_files
from stacking.apply import apply_stage_two

from .predict_split import fold_checkpoints, predict_test

NOTICE = "Research use only - not for clinical use."


def prepare_config_like(train_dir: Path) -> PrepareConfig:
    """The prepare settings of the train cache, so the study's images are made like the training images."""
    meta = read_meta(train_dir)
    if meta is None:
        raise StudyError(f"no cache_meta.json in {train_dir}: the models' train cache is needed for its settings")
    return prepare_config_from({**cache_settings(meta), "n_jobs": 1}, str(train_dir / "cache_meta.json"), "study")


def _model_tree(cfg, model_dir: Path, tmp: Path) -> Path:
    """A model folder whose checkpoints and stage two link to the real ones; test outputs land in tmp."""
    tree = tmp / "models"
    for exp in cfg.experiments:
        checkpoints = fold_checkpoints(model_dir / exp)
        if not checkpoints:
            raise StudyError(f"no fold checkpoints in {model_dir / exp}: run train.py for {exp} first")
        (tree / exp).mkdir(parents=True)
        for path in checkpoints.values():
            (tree / exp / path.name).symlink_to(path.resolve())
    (tree / "stacking").mkdir()
    (tree / "stacking" / cfg.name).symlink_to((model_dir / "stacking" / cfg.name).resolve())
    return tree


def predict_study(study: Path, cfg, *, train_dir: Path, model_dir: Path, runtime, log=print) -> dict:
    """-> {"slices": DataFrame (file, image_id, slice_index, z, six probabilities), "skipped", "series", ...}."""
    timings, t = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="ich_study_") as tmp:
        tmp = Path(tmp)
        files = choose_series(study_files(study, tmp))
        timings["read"] = time.time() - t
        if not files.chosen:
            raise StudyError(f"{study}: no axial CT series found ({len(files.skipped)} files, reasons: "
                             + ", ".join(sorted({s['reason'] for s in files.skipped})) + ")")
        split = tmp / "raw" / "stage_2_test"
        split.mkdir(parents=True)
        for s in files.chosen:  # named by SOPInstanceUID, like Kaggle's files
            (split / f"{s['image_id']}.dcm").symlink_to(Path(s["path"]).resolve())
        clean = tmp / "clean"
        prepare_split(tmp / "raw", clean, "test", prepare_config_like(train_dir), progress=False)
        slices = pd.read_parquet(clean / "slices.parquet")
        rejected = pd.read_csv(clean / "rejected.csv") if (clean / "rejected.csv").is_file() else None
        timings["prepare"] = time.time() - t - timings["read"]
        tree = _model_tree(cfg, model_dir, tmp)
        for exp in cfg.experiments:
            predict_test(tree / exp, clean, runtime, batch_size=cfg.batch_size, num_workers=0, progress=False,
                         log=lambda *a: None)
        timings["stage one"] = time.time() - t - timings["read"] - timings["prepare"]
        probs = apply_stage_two(cfg, tree, slices)
        timings["stage two"] = time.time() - t - sum(timings.values())
    names = {s["image_id"]: s["file"] for s in files.chosen}
    table = slices[["image_id", "slice_index", "z"]].merge(probs, on="image_id")
    table.insert(0, "file", table["image_id"].map(names))
    table = table.sort_values("slice_index").reset_index(drop=True)
    skipped = list(files.skipped)
    if rejected is not None:
        skipped += [{"file": names.get(r.image_id, r.file), "reason": r.reason, "detail": r.detail}
                    for r in rejected.itertuples()]
    log(f"study: {len(table)} slices of the chosen series predicted, {len(skipped)} files skipped")  # no UIDs in logs
    return {"slices": table, "skipped": skipped, "series": files.series, "series_id": files.series_id,
            "timings": timings, "experiments": list(cfg.experiments), "stage_two": cfg.name}


def write_outputs(result: dict, out_dir: Path) -> dict:
    """study.csv (per slice), study_kaggle.csv (ID_<image>_<label>,Label) and study.json; atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = result["slices"]
    long = table.melt(id_vars=["image_id"], value_vars=list(LABELS), var_name="label", value_name="Label")
    long = long.assign(ID=long["image_id"] + "_" + long["label"])[["ID", "Label"]]
    paths = {"csv": out_dir / "study.csv", "kaggle_csv": out_dir / "study_kaggle.csv", "json": out_dir / "study.json"}
    write_atomic(paths["csv"], lambda p: table.to_csv(p, index=False, float_format="%.6g"))
    write_atomic(paths["kaggle_csv"], lambda p: long.to_csv(p, index=False, float_format="%.6g"))
    doc = {"notice": NOTICE, "series_id": result["series_id"], "series": result["series"],
           "experiments": result["experiments"], "stage_two": result["stage_two"],
           "timings_s": {k: round(v, 3) for k, v in result["timings"].items()},
           "slices": table.to_dict(orient="records"), "skipped": result["skipped"]}
    write_atomic(paths["json"], lambda p: p.write_text(json.dumps(doc, indent=1, default=str)))
    return paths


def study_cli(study: str, out: str | None, settings, cfg) -> dict:
    """predict.py --study: run one study, write its outputs, print where they are."""
    from ich.settings import require_writable

    from . import runtime as rt
    out_dir = Path(out) if out else settings.logs_dir / "study"
    require_writable({"--out": out_dir})
    runtime = rt.setup(cfg.amp, True)
    try:
        result = predict_study(Path(study), cfg, train_dir=settings.train_clean_dir,
                               model_dir=settings.model_checkpoint_dir, runtime=runtime)
    finally:
        rt.teardown()
    paths = write_outputs(result, out_dir)
    top = result["slices"][list(LABELS)].max()
    print("highest probability per label: " + ", ".join(f"{k} {v:.3f}" for k, v in top.items()))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()) + f"\n{NOTICE}")
    return paths
