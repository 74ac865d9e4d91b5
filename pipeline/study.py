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

import io
import tempfile
import time
from pathlib import Path

import pandas as pd
import pydicom

from ich.labels import LABELS
from ich.stage_one import fold_checkpoints
from ich.study import NO_DEADLINE, Deadline, StudyError, StudyFiles, choose_series, reason_summary, study_files
from stacking.run import STAGE_TWO

from .decode import SliceFile
from .engine import Engine
from .notice import NOTICE

MIN_SLICES = 3  # one or two slices are no series: stage two reads each slice's neighbors along z
SOURCE_BYTES = 256 << 20  # keep_images: the series' files kept in memory for the viewer up to this size


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
    """A folder, a zip or a list of (name, path) -> its files sorted out (ich.study.choose_series); checked.
    work: where a zip is extracted (a folder is read where it is)."""
    skipped: list = []
    listed = study if isinstance(study, list) else study_files(study, work, skipped, deadline=deadline)
    files = choose_series(listed, series_index=series_index, skipped=skipped, deadline=deadline)
    check_chosen(files, "the upload" if isinstance(study, list) else Path(study).name)
    return files


THUMBNAIL = 96  # px, the series list's picture of each series


def series_view(path) -> dict:
    """One series' picture for the series list (its middle slice, brain window, THUMBNAIL px, PNG bytes) and its
    description; {} where the file cannot give them (the list then shows none)."""
    import cv2

    from pydicom.errors import InvalidDicomError

    from ich.dicom import Rejected, read_hu
    from ich.image import Window, window_linear

    if path is None:
        return {}
    try:
        _, hu = read_hu(path)
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesDescription"])
    except (Rejected, OSError, ValueError, InvalidDicomError):
        return {}
    image = cv2.resize(window_linear(hu, Window("brain", 40, 80)), (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", image)
    text = " ".join(str(header.get("SeriesDescription") or "").split())[:64]
    return {"thumbnail": png.tobytes() if ok else None, "description": text or None}


def predict_study(files: StudyFiles, engine: Engine, *, keep_images: bool = False, log=print) -> dict:
    """-> {"slices": DataFrame (file, image_id, slice_index, z, six probabilities), "skipped", "series", ...}.

    files: the study's files sorted out (`select_study`; the web app reads
    and sorts them before it waits for the model). The chosen series goes
    through the engine as one group; a chosen file that prepare_data would
    reject joins `skipped` with prepare_data's reason.
    keep_images: also return the cache-like windows of every slice in table
    order ("images", n x H x W x windows uint8, "windows" their names), for
    display and Grad-CAM, and the series' files as bytes ("sources", up to
    SOURCE_BYTES) for the viewer's source-resolution images. "headers" (the
    slices' DICOM headers, no pixels, table order) feed the DICOM SR.
    """
    check_chosen(files)
    timings = {}
    names = {s["image_id"]: s["file"] for s in files.chosen}
    paths = {s["image_id"]: Path(s["path"]) for s in files.chosen}
    chosen = [SliceFile(str(s["path"]), s["file"], s["image_id"]) for s in files.chosen]
    pred = engine.predict(chosen, keep_images=keep_images)
    timings.update(pred.timings)
    if not len(pred.slices):
        raise StudyError(f"none of the {len(files.chosen)} slices of the chosen series could be read: "
                         + reason_summary(pred.rejected.to_dict(orient="records")))
    t = time.perf_counter()
    slices = pred.slices.sort_values("slice_index", kind="mergesort")
    order = slices.index.to_numpy()
    slices = slices.reset_index(drop=True)
    probs = pred.probs.iloc[order].reset_index(drop=True)
    extra = {}
    if keep_images:
        sources = [paths[i].read_bytes() for i in slices["image_id"]]  # read once; headers parsed from them
        headers = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in sources]
        windows = [{"name": w.name, "center": w.center, "width": w.width} for w in engine.prepare_cfg.windows]
        extra = {"images": pred.images[order],
                 "series_views": {s["index"]: series_view(files.samples.get(s["series_id"])) for s in files.series},
                 "windows": [w["name"] for w in windows], "window_levels": windows,
                 "sources": sources if sum(map(len, sources)) <= SOURCE_BYTES else None}
    else:
        headers = [pydicom.dcmread(paths[i], stop_before_pixels=True) for i in slices["image_id"]]
    table = slices[["image_id", "slice_index", "z"]].merge(probs, on="image_id", how="left", validate="1:1")
    table.insert(0, "file", table["image_id"].map(names))
    skipped = list(files.skipped) + [{"file": r.file, "reason": r.reason, "detail": r.detail}
                                     for r in pred.rejected.itertuples()]
    timings["outputs"] = time.perf_counter() - t
    log(f"study: {len(table)} slices of the chosen series predicted, {len(skipped)} files skipped")  # no UIDs in logs
    return {"slices": table, "skipped": skipped, "series": files.series, "series_id": files.series_id,
            "timings": timings, "experiments": list(engine.cfg.experiments), "stage_two": engine.cfg.name,
            "headers": headers, **extra}


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
        with tempfile.TemporaryDirectory(prefix="ich_study_") as work:  # a zip is extracted here, then gone
            files = select_study(Path(study), Path(work))
            result = predict_study(files, engine)
    finally:
        engine.close()
        rt.teardown()
    paths = write_outputs(result, out_dir, model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir))
    top = result["slices"][list(LABELS)].max()
    print("highest probability per label: " + ", ".join(f"{k} {v:.3f}" for k, v in top.items()))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()) + f"\n{NOTICE}")
    return paths
