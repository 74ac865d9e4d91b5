"""One study -> per-slice probabilities of the six labels, by the batch path's own code.

ich.study picks the study's axial CT series and gives every other file a
reason. Its slices are then laid out as a one-study Kaggle test split in a
temporary folder and go through exactly what predict.py runs on the test
set: ich.prepare.prepare_split (same DICOM reading, HU, windows, cache,
with the train cache's image settings), models.predict_split (every fold
model of every experiment of the predict config) and stacking.apply (the
boosters predict.py trained, with their saved PCAs). Nothing of the study
is kept: the temporary folder goes when the call returns, on error too.
Outputs (`output_bytes`, written by `write_outputs` for the CLI and served
by the web app, web/): a per-slice CSV, the same rows in Kaggle's
`ID_<image>_<label>` form, a JSON with the skipped files and the model, and a
DICOM SR (models.sr). Every one carries the research-use notice; the CSVs as
a first `#` comment line (pandas: `read_csv(path, comment="#")`).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from ich.cache import open_images, read_meta, write_atomic
from ich.config import PrepareConfig, cache_settings, prepare_config_from
from ich.labels import LABELS
from ich.prepare import PrepareError, prepare_split
from ich.study import NO_DEADLINE, Deadline, StudyError, StudyFiles, choose_series, reason_summary, study_files
from stacking.apply import apply_stage_two
from stacking.run import STAGE_TWO

from .predict_split import fold_checkpoints, predict_test

NOTICE = "Research use only - not for clinical use."
MIN_SLICES = 3  # one or two slices are no series: stage two reads each slice's neighbors along z


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


def model_info(cfg, model_dir: Path, logs_dir: Path | None = None) -> dict:
    """What made the probabilities: experiments, fold models, stage two and its honest out-of-fold score."""
    info = {"experiments": list(cfg.experiments),
            "folds": {exp: len(fold_checkpoints(model_dir / exp)) for exp in cfg.experiments},
            "stage_two": cfg.name, "oof_score": None}
    metrics = (logs_dir / "stacking" / cfg.name / "metrics.csv") if logs_dir else None
    if metrics is not None and metrics.is_file():
        table = pd.read_csv(metrics, index_col=0)
        if STAGE_TWO in table.index:
            info["oof_score"] = float(table.loc[STAGE_TWO, "weighted"])
    return info


def check_chosen(files: StudyFiles, what: str = "the upload") -> None:
    """StudyError, in plain words, when the files hold no series the models can read: how many files,
    the reasons with counts and a few names as given; never a server path."""
    if not files.chosen:
        n = len(files.skipped)
        if n == 0:
            raise StudyError(f"{what} holds no files")
        raise StudyError(f"no axial CT series found in {what}: {n} file{'s' * (n != 1)} not used: "
                         + reason_summary(files.skipped))
    if len(files.chosen) < MIN_SLICES:
        raise StudyError(f"the chosen CT series has {len(files.chosen)} slice(s): the models read a series "
                         f"along z (at least {MIN_SLICES} slices; a head CT has dozens); upload the whole series")


def select_study(study, work: Path, *, series_index: int | None = None,
                 deadline: Deadline = NO_DEADLINE) -> StudyFiles:
    """A folder, a zip or a list of (name, path) -> its files sorted out (ich.study.choose_series); checked."""
    skipped: list = []
    listed = study if isinstance(study, list) else study_files(study, work, skipped, deadline=deadline)
    files = choose_series(listed, series_index=series_index, skipped=skipped, deadline=deadline)
    check_chosen(files, "the upload" if isinstance(study, list) else Path(study).name)
    return files


def _prepare_failed(clean: Path, files: StudyFiles) -> str:
    """prepare_data found no usable slice: its reasons per file, with the names as given."""
    names = {s["image_id"]: s["file"] for s in files.chosen}  # the split's files are <image_id>.dcm
    try:
        rejected = pd.read_csv(clean / "rejected.csv", keep_default_na=False)
        listed = [{"file": names.get(Path(str(r.file)).stem, "a slice"), "reason": r.reason}
                  for r in rejected.itertuples()]
    except (OSError, ValueError, AttributeError):
        listed = []
    return (f"none of the {len(files.chosen)} slices of the chosen series could be read"
            + (f": {reason_summary(listed)}" if listed else ""))


def predict_study(study, cfg, *, train_dir: Path, model_dir: Path, runtime, series_index: int | None = None,
                  keep_images: bool = False, log=print, work_dir: Path | None = None) -> dict:
    """-> {"slices": DataFrame (file, image_id, slice_index, z, six probabilities), "skipped", "series", ...}.

    study: a folder or zip path, a list of (name to report, path) pairs, or
    the StudyFiles that `select_study` made of them already (the web app
    reads and sorts the files before it waits for the model). series_index:
    a CT series other than the automatic choice (ich.study.choose_series).
    keep_images: also return the
    cached windows of every slice in table order ("images", n x H x W x
    windows uint8, "windows" their names), for display and Grad-CAM; they are
    copied to memory before the temporary folder goes. "headers" (the
    slices' DICOM headers, no pixels, table order) feed the DICOM SR.
    work_dir: where the temporary folder goes (default: the system's).
    """
    timings, t = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="ich_study_", dir=work_dir) as tmp:
        tmp = Path(tmp)
        files = study if isinstance(study, StudyFiles) else select_study(study, tmp, series_index=series_index)
        check_chosen(files)
        timings["read"] = time.time() - t
        split = tmp / "raw" / "stage_2_test"
        split.mkdir(parents=True)
        for s in files.chosen:  # named by SOPInstanceUID, like Kaggle's files
            (split / f"{s['image_id']}.dcm").symlink_to(Path(s["path"]).resolve())
        clean = tmp / "clean"
        try:
            prepare_split(tmp / "raw", clean, "test", prepare_config_like(train_dir), progress=False)
        except PrepareError:  # no slice could be read: the reasons, without the temporary path
            raise StudyError(_prepare_failed(clean, files)) from None
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
        slices = slices.sort_values("slice_index", kind="mergesort").reset_index(drop=True)
        paths = {s["image_id"]: Path(s["path"]) for s in files.chosen}
        headers = [pydicom.dcmread(paths[i], stop_before_pixels=True) for i in slices["image_id"]]
        extra = {}
        if keep_images:
            extra = {"images": np.array(open_images(clean)[slices["cache_row"].to_numpy()]),
                     "windows": [w["name"] for w in cache_settings(read_meta(clean))["windows"]]}
    names = {s["image_id"]: s["file"] for s in files.chosen}
    table = slices[["image_id", "slice_index", "z"]].merge(probs, on="image_id", how="left", validate="1:1")
    table.insert(0, "file", table["image_id"].map(names))
    skipped = list(files.skipped)
    if rejected is not None:
        skipped += [{"file": names.get(r.image_id, r.file), "reason": r.reason, "detail": r.detail}
                    for r in rejected.itertuples()]
    log(f"study: {len(table)} slices of the chosen series predicted, {len(skipped)} files skipped")  # no UIDs in logs
    return {"slices": table, "skipped": skipped, "series": files.series, "series_id": files.series_id,
            "timings": timings, "experiments": list(cfg.experiments), "stage_two": cfg.name,
            "headers": headers, **extra}


def _csv(frame: pd.DataFrame) -> bytes:
    """A CSV whose first line is the notice as a comment (read it with pandas' `comment="#"`)."""
    return (f"# {NOTICE}\n" + frame.to_csv(index=False, float_format="%.6g")).encode()


def study_document(result: dict, model: dict | None = None) -> dict:
    """The JSON output: notice, series, model, timings, per-slice probabilities and every skipped file."""
    return {"notice": NOTICE, "series_id": result["series_id"], "series": result["series"],
            "experiments": result["experiments"], "stage_two": result["stage_two"], "model": model,
            "timings_s": {k: round(v, 3) for k, v in result["timings"].items()},
            "slices": result["slices"].to_dict(orient="records"), "skipped": result["skipped"]}


OUTPUTS = {"csv": "study.csv", "kaggle_csv": "study_kaggle.csv", "json": "study.json", "sr": "study_sr.dcm"}


def output_bytes(result: dict, kind: str, model: dict | None = None) -> bytes:
    """One output of a study, as bytes: the CLI writes them, the web app serves them (one place for both)."""
    table = result["slices"]
    if kind == "csv":
        return _csv(table)
    if kind == "kaggle_csv":
        long = table.melt(id_vars=["image_id"], value_vars=list(LABELS), var_name="label", value_name="Label")
        return _csv(long.assign(ID=long["image_id"] + "_" + long["label"])[["ID", "Label"]])
    if kind == "json":
        return json.dumps(study_document(result, model), indent=1, default=str).encode()
    if kind == "sr":
        from .sr import build_sr, sr_bytes
        model = model or {"experiments": result["experiments"], "folds": None, "stage_two": result["stage_two"],
                          "oof_score": None}
        return sr_bytes(build_sr(result["headers"], table, model=model))
    raise ValueError(f"unknown study output {kind!r}: one of {', '.join(OUTPUTS)}")


def write_outputs(result: dict, out_dir: Path, model: dict | None = None) -> dict:
    """study.csv (per slice), study_kaggle.csv (ID_<image>_<label>,Label), study.json, study_sr.dcm; atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, name in OUTPUTS.items():
        data = output_bytes(result, kind, model)
        paths[kind] = out_dir / name
        write_atomic(paths[kind], lambda p, d=data: p.write_bytes(d))
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
    paths = write_outputs(result, out_dir, model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir))
    top = result["slices"][list(LABELS)].max()
    print("highest probability per label: " + ", ".join(f"{k} {v:.3f}" for k, v in top.items()))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()) + f"\n{NOTICE}")
    return paths
