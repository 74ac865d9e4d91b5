"""One study -> per-slice probabilities of the six labels, through the in-memory engine.

ich.study picks the study's axial CT series and gives every other file a
reason. Its slices then go to the engine (pipeline.engine), which holds
every fold model of the predict config and the saved stage two: the same
reading as prepare_data (its own decode_files, with the checkpoints' image
settings), the same network inputs, every fold model, stage-two member k
on fold model k, the saved blend. No temporary folder, no symlink, no file
is written; tests/test_study.py holds the result equal to the batch path.
Outputs (pipeline.outputs: one registry of kind -> bytes, file name and
media type, for the CLI and the web app): a per-slice CSV, the same rows in
Kaggle's `ID_<image>_<label>` form, a JSON with the skipped files and the
model, and a DICOM SR (pipeline.sr). Every one carries the research-use
notice (pipeline.notice); the CSVs as a first `#` comment line (pandas:
`read_csv(path, comment="#")`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from ich.labels import LABELS
from ich.rawdata import Member
from ich.stage_one import fold_checkpoints
from ich.study import (MIN_SLICES, NO_DEADLINE, Deadline, StudyError, StudyFiles, check_chosen,  # noqa: F401
                       choose_series, reason_summary, study_files)
from stacking.run import STAGE_TWO

from .decode import SliceFile
from .engine import Engine
from .headers import slim_header
from .result import StudyResult
from .notice import NOTICE

SOURCE_BYTES = 256 << 20  # keep_images: the series' files kept in memory for the viewer up to this size
SOURCE_PIXELS = 1024 * 1024  # keep_images: a slice above this (Rows x Columns) is never kept (the viewer's cap)
SOURCE_FILE_BYTES = 8 * SOURCE_PIXELS + (1 << 20)  # nor a file larger than such a slice takes


def kept_sources(paths: list, headers: list[pydicom.Dataset]) -> list[bytes] | None:
    """The series' files (paths, or a study zip's Members) for the viewer's source-resolution images, or
    None when any slice is larger than SOURCE_PIXELS / SOURCE_FILE_BYTES or all of them more than
    SOURCE_BYTES (the viewer then shows the network's windows)."""
    sizes = [p.file_size if isinstance(p, Member) else Path(p).stat().st_size for p in paths]
    if sum(sizes) > SOURCE_BYTES or max(sizes, default=0) > SOURCE_FILE_BYTES:
        return None
    if any(int(h.get("Rows") or 0) * int(h.get("Columns") or 0) > SOURCE_PIXELS for h in headers):
        return None
    return [_file_bytes(p) for p in paths]


def _file_bytes(ref) -> bytes:
    """A file's bytes; a zip member through a handle of its own, closed at once: the web app calls this in
    its long-lived process, which must not keep a deleted upload open."""
    if not isinstance(ref, Member):
        return Path(ref).read_bytes()
    with open(ref.archive, "rb") as handle:
        return ref.read(SOURCE_FILE_BYTES, handle)


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


def select_study(study, work: Path | None = None, *, series_index: int | None = None,
                 deadline: Deadline = NO_DEADLINE) -> StudyFiles:
    """A folder, a zip or a list of (name, path) -> its files sorted out (ich.study.choose_series); checked.
    A folder and a zip are read where they are (work: unused, where a zip used to be extracted)."""
    skipped: list = []
    listed = study if isinstance(study, list) else study_files(study, work, skipped, deadline=deadline)
    files = choose_series(listed, series_index=series_index, skipped=skipped, deadline=deadline)
    check_chosen(files, "the upload" if isinstance(study, list) else Path(study).name)
    return files


THUMBNAIL = 96  # px, the series list's picture of each series


def thumbnail(images: np.ndarray) -> bytes | None:
    """A series' picture for the series list: its middle slice's first window (brain), THUMBNAIL px, PNG;
    made from the images already decoded for the models, never by decoding a file again."""
    import cv2

    if images is None or not len(images):
        return None
    image = cv2.resize(np.ascontiguousarray(images[len(images) // 2, :, :, 0]), (THUMBNAIL, THUMBNAIL),
                       interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", image)
    return png.tobytes() if ok else None


def study_result(files: StudyFiles, pred, engine: Engine, *, keep_images: bool = False, headers=None,
                 timings: dict | None = None) -> StudyResult:
    """The engine's Prediction of files.chosen -> a StudyResult (rows in z-order, file names, skipped).
    headers: the slices' slim headers by image_id when read already (web.reader reads them in its process)."""
    if not len(pred.slices):
        raise StudyError(f"none of the {len(files.chosen)} slices of the chosen series could be read: "
                         + reason_summary(pred.rejected.to_dict(orient="records")))
    timings = {**(timings or {}), **pred.timings}
    t = time.perf_counter()
    names = {s["image_id"]: s["file"] for s in files.chosen}
    paths = {s["image_id"]: s["path"] for s in files.chosen}  # a path, or a study zip's Member
    slices = pred.slices.sort_values("slice_index", kind="mergesort")
    order = slices.index.to_numpy()
    slices = slices.reset_index(drop=True)
    probs = pred.probs.iloc[order].reset_index(drop=True)
    ids = list(slices["image_id"])
    heads = [headers[i] for i in ids] if headers is not None else [slim_header(paths[i]) for i in ids]
    table = slices[["image_id", "slice_index", "z"]].merge(probs, on="image_id", how="left", validate="1:1")
    table.insert(0, "file", table["image_id"].map(names))
    skipped = list(files.skipped) + [{"file": r.file, "reason": r.reason, "detail": r.detail}
                                     for r in pred.rejected.itertuples()]
    extra = {}
    if keep_images:
        extra = {"images": pred.images[order], "sources": kept_sources([paths[i] for i in ids], heads),
                 "window_levels": [{"name": w.name, "center": w.center, "width": w.width}
                                   for w in engine.prepare_cfg.windows]}
    timings["outputs"] = time.perf_counter() - t
    return StudyResult(table, skipped, files.series, files.series_id, timings, list(engine.cfg.experiments),
                       engine.cfg.name, heads, **extra)


def predict_study(files: StudyFiles, engine: Engine, *, keep_images: bool = False, log=print) -> StudyResult:
    """The chosen series of `files` (sorted out by `select_study`) through the engine, as one group.

    A chosen file that prepare_data would reject joins `skipped` with
    prepare_data's reason. keep_images: also keep the cache-like windows of
    every slice (display, Grad-CAM) and, within SOURCE_*, the files
    themselves (the viewer's source-resolution images).
    """
    check_chosen(files)
    chosen = [SliceFile(s["path"] if isinstance(s["path"], Member) else str(s["path"]), s["file"],
                        s["image_id"]) for s in files.chosen]
    result = study_result(files, engine.predict(chosen, keep_images=keep_images), engine, keep_images=keep_images)
    log(f"study: {len(result.slices)} slices of the chosen series predicted, {len(result.skipped)} files skipped")
    return result


def study_cli(study: str, out: str | None, settings, cfg) -> dict:
    """predict.py --study: load the engine, run one study, write its outputs, print where they are."""
    from ich.settings import require_writable
    from models import runtime as rt

    from .outputs import write_outputs

    out_dir = Path(out) if out else settings.logs_dir / "study"
    require_writable({"--out": out_dir})
    runtime = rt.setup(cfg.amp, True)
    engine = Engine(cfg, settings.model_checkpoint_dir, runtime, train_dir=settings.train_clean_dir)
    try:
        files = select_study(Path(study))  # a zip is read in place: nothing is extracted
        result = predict_study(files, engine)
    finally:
        engine.close()
        rt.teardown()
    paths = write_outputs(result, out_dir, model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir))
    top = result.slices[list(LABELS)].max()
    print("highest probability per label: " + ", ".join(f"{k} {v:.3f}" for k, v in top.items()))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()) + f"\n{NOTICE}")
    return paths
