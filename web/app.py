"""serve.py's web application and its JSON API (FastAPI), on the study path of predict.py.

API (the page uses nothing else):
- `POST /api/studies[?series=N]`: multipart form, field `files`: one .zip or
  several DICOM files of one study. -> 201 and the result (below). `series`
  picks another CT series of the same files by its index in `series`.
- `GET /api/studies/{id}`: the result again.
- `GET /api/studies`: the results this server keeps (id, tag, when, slice
  count; nothing of the patient), the most recent first.
- `GET /api/studies/{id}/download/{csv|kaggle_csv|json|sr}[?threshold=T]`:
  the outputs of `predict.py --study`, from the same code
  (models.study.output_bytes), at the page's threshold T in (0, 1) (default
  0.5; anything else is a 400), named by the result's tag
  (`ich_<id>_<date>...`), never by patient data.
- `GET /api/studies/{id}/patient`: patient name and ID, for the page to show
  only when the user asks (never put in a URL, never logged).
- `GET /api/studies/{id}/series/{index}/thumbnail.png`: the series list's
  picture of a series (its middle slice, brain window).
- `GET /api/studies/{id}/slices/{row}/image.png?window=brain`: one slice in
  one of the cache's windows, as the network saw it (8-bit).
- `GET /api/studies/{id}/slices/{row}/hu.png`: the slice at its source
  resolution in HU, for the viewer's own window/level: an RGB PNG whose red
  and green bytes are HU + 32768 (high, low). 404 when the server did not
  keep the series' files (larger than models.study.SOURCE_BYTES).
- `GET /api/studies/{id}/slices/{row}/cam.png?label=subdural`: its Grad-CAM
  as an RGBA heat map (alpha = attention), to lay over the image.
- `DELETE /api/studies/{id}`: forget a result now. `GET /api/health`.
Errors are JSON `{"error": "..."}` with 400 (the upload), 404, 411/413 (size),
503 (queue full), 500 (the model side; logged without patient data).

Safety: each upload is written to a temporary folder that is deleted when
the request ends, on error too; results live in memory only (web.store).
File names in the folder are numbers; the uploaded names are only reported
back. Nothing with patient data (names, IDs, UIDs) is logged: log lines say
counts and timings.
"""
from __future__ import annotations

import io
import logging
import math
import re
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.requests import ClientDisconnect

from ich.labels import LABELS, SUBTYPES
from ich.study import MAX_FILES, StudyError
from models.predict_split import InferenceError
from models.study import NOTICE, OUTPUTS, output_bytes

from .engine import Busy, Engine
from .store import StudyStore

HERE = Path(__file__).resolve().parent
log = logging.getLogger("ich.web")
MEDIA = {"csv": "text/csv", "kaggle_csv": "text/csv", "json": "application/json", "sr": "application/dicom"}
SUFFIX = {"csv": ".csv", "kaggle_csv": "_kaggle.csv", "json": ".json", "sr": "_sr.dcm"}  # after the result tag


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _safe_name(name: str | None, i: int) -> str:
    """The uploaded name, for reporting only: no folders, no control characters, bounded length."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()[:200]
    return base or f"file {i + 1}"


def result_tag(study_id: str, result: dict) -> str:
    """A short name for a result's downloads: part of its random id and the day it was made; no patient data."""
    day = time.strftime("%Y%m%d", time.localtime(result.get("created", time.time())))
    return f"ich_{re.sub(r'[^A-Za-z0-9]', '', study_id)[:8]}_{day}"


def _text(header, key: str) -> str | None:
    value = header.get(key) if header is not None else None
    return " ".join(str(value).split())[:120] or None if value not in (None, "") else None


def study_header(result: dict) -> dict:
    """The viewer's study header, from the chosen series' DICOM headers: no patient name or ID here."""
    headers = result.get("headers") or []
    first = headers[0] if headers else None
    date = _text(first, "StudyDate")
    if date and re.fullmatch(r"\d{8}", date):
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    try:
        thickness = float(first.get("SliceThickness")) if first is not None and first.get("SliceThickness") else None
    except (TypeError, ValueError):
        thickness = None
    z = result["slices"]["z"].to_numpy(dtype=float)
    spacing = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else None
    return {"study_date": date, "series_description": _text(first, "SeriesDescription"),
            "modality": _text(first, "Modality"), "slice_thickness_mm": thickness,
            "slice_spacing_mm": round(spacing, 3) if spacing is not None and math.isfinite(spacing) else None,
            "n_slices": len(result["slices"]),
            "source_size": [int(first.Rows), int(first.Columns)] if first is not None and "Rows" in first else None}


def public_result(study_id: str, result: dict, model: dict) -> dict:
    """What the page needs: the probabilities per slice, series, skipped files, timings, model, notice."""
    table = result["slices"]
    chosen = result["series_id"]
    return {
        "id": study_id, "tag": result_tag(study_id, result), "created": result.get("created"),
        "study": study_header(result), "window_levels": result.get("window_levels"),
        "source_images": bool(result.get("sources")),
        "notice": NOTICE, "labels": list(LABELS), "subtypes": list(SUBTYPES),
        "series": [{"index": s["index"], "n_files": s["n_files"], "axial": s["axial"],
                    "chosen": s["series_id"] == chosen,
                    "description": result.get("series_views", {}).get(s["index"], {}).get("description"),
                    "thumbnail": bool(result.get("series_views", {}).get(s["index"], {}).get("thumbnail"))}
                   for s in result["series"]],
        "slices": [{"row": i, "file": r["file"], "slice_index": int(r["slice_index"]), "z": float(r["z"]),
                    **{label: float(r[label]) for label in LABELS}} for i, r in enumerate(table.to_dict("records"))],
        "skipped": result["skipped"], "windows": result["windows"], "image_size": int(result["images"].shape[1]),
        "timings_s": {k: round(v, 3) for k, v in result["timings"].items()}, "model": model,
    }


def _png(image: np.ndarray, level: int = 3) -> Response:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ApiError(500, "could not encode the image")
    return Response(data.tobytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def hu_png(data: bytes) -> np.ndarray:
    """One source DICOM file (bytes, already read once by the study path) -> H x W x 3 uint8 (BGR) whose
    red and green bytes are HU + 32768 (high, low byte), at the file's own resolution.

    Why this and not windowed PNGs: the viewer's window/level then runs in the browser on every drag
    without a request, for any centre/width (bone's 2800 HU too), at source resolution; a slice step is
    one request of ~5 ms decoding here. The cached 8-bit windows (image.png) are the network's input
    size and clip to their own ranges; the viewer falls back to them when the files were not kept.
    """
    from ich.dicom import _fill_transfer_syntax, header_from_dataset, to_hu

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    _fill_transfer_syntax(ds)
    hu = to_hu(ds.pixel_array, header_from_dataset(ds))
    v = (np.rint(hu).astype(np.int32) + 32768).clip(0, 65535)
    return np.dstack([np.zeros_like(v, np.uint8), (v & 255).astype(np.uint8), (v >> 8).astype(np.uint8)])


def heat_map(cam: np.ndarray) -> np.ndarray:
    """CAM in [0, 1] -> BGRA: the jet colour map, opaque where the network looked, transparent elsewhere."""
    bgr = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    return np.dstack([bgr, alpha])


def create_app(engine: Engine, *, max_upload_mb: int = 1024, max_studies: int = 8) -> FastAPI:
    app = FastAPI(title="ICH study viewer (research use only)", docs_url="/api/docs", redoc_url=None)
    store = StudyStore(max_studies)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.engine, app.state.store = engine, store
    max_bytes = max_upload_mb << 20

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def result_of(study_id: str) -> dict:
        result = store.get(study_id)
        if result is None:
            raise ApiError(404, "no such study here (results are kept in memory for the last "
                                f"{store.max_studies} studies only): upload it again")
        return result

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request):
        return templates.TemplateResponse(request, "index.html", {
            "notice": NOTICE, "model": engine.model, "max_upload_mb": max_upload_mb, "labels": list(LABELS)})

    @app.get("/api/health")
    async def health():
        return {"ok": True, "model": engine.model, "studies_in_memory": len(store), "notice": NOTICE}

    @app.post("/api/studies", status_code=201)
    async def upload(request: Request, series: int | None = None):
        t0 = time.time()
        length = request.headers.get("content-length")
        if length is None:
            raise ApiError(411, "the upload must state its size (Content-Length)")
        if not length.isdigit():
            raise ApiError(400, "the upload's Content-Length is not a number")
        if int(length) > max_bytes:
            raise ApiError(413, f"the upload is larger than {max_upload_mb} MB")
        with tempfile.TemporaryDirectory(prefix="ich_upload_") as tmp:
            tmp = Path(tmp)
            try:
                form = await request.form(max_files=MAX_FILES, max_fields=20)
            except ClientDisconnect:
                log.info("upload: the client went away before the upload ended")
                return Response(status_code=400)
            except Exception as exc:  # noqa: BLE001 - a truncated or malformed multipart body
                raise ApiError(400, f"the upload could not be read (incomplete or not a file upload: "
                                    f"{type(exc).__name__})") from None
            try:
                files = [f for f in form.getlist("files") if hasattr(f, "read")]
                if not files:
                    raise ApiError(400, "no complete file in the upload (an upload cut short arrives without "
                                        "its files): send one .zip or the DICOM files of one study in the form "
                                        "field 'files'")
                listed = []
                for i, f in enumerate(files):
                    path = tmp / f"{i:05d}"
                    with open(path, "wb") as out:
                        while chunk := await f.read(1 << 20):
                            out.write(chunk)
                    listed.append((_safe_name(f.filename, i), path))
            finally:
                await form.close()
            received = time.time() - t0
            study = listed[0][1] if len(listed) == 1 and zipfile.is_zipfile(listed[0][1]) else listed
            try:
                result = await run_in_threadpool(engine.run, study, series)
            except StudyError as exc:
                raise ApiError(400, " ".join(str(exc).split())) from None
            except Busy as exc:
                raise ApiError(503, str(exc)) from None
            except InferenceError as exc:
                log.error("inference failed: %s", exc)
                raise ApiError(500, f"the model could not run: {exc}") from None
        result["timings"] = {"upload": received, **result["timings"], "total": time.time() - t0}
        result["created"] = time.time()
        study_id = store.add(result)
        log.info("study: %d slices, %d files skipped, %.2f s", len(result["slices"]), len(result["skipped"]),
                 result["timings"]["total"])
        return public_result(study_id, result, engine.model)

    @app.get("/api/studies")
    async def recent():
        return {"studies": [{"id": sid, "tag": result_tag(sid, r), "created": r.get("created"),
                             "n_slices": len(r["slices"])} for sid, r in store.recent()]}

    @app.get("/api/studies/{study_id}/patient")
    async def patient(study_id: str):
        headers = result_of(study_id).get("headers") or [None]
        return {"patient_name": _text(headers[0], "PatientName"), "patient_id": _text(headers[0], "PatientID")}

    @app.get("/api/studies/{study_id}")
    async def get_study(study_id: str):
        return public_result(study_id, result_of(study_id), engine.model)

    @app.delete("/api/studies/{study_id}")
    async def forget(study_id: str):
        if not store.forget(study_id):
            raise ApiError(404, "no such study here")
        return {"forgotten": True}

    @app.get("/api/studies/{study_id}/download/{kind}")
    async def download(study_id: str, kind: str, threshold: str | None = None):
        if kind not in OUTPUTS:
            raise ApiError(404, f"no output {kind!r}: one of {', '.join(OUTPUTS)}")
        cut = 0.5
        if threshold is not None:
            try:
                cut = float(threshold)
            except ValueError:
                cut = math.nan
            if not 0 < cut < 1:  # NaN too
                raise ApiError(400, f"the threshold must be a number between 0 and 1 (both excluded), "
                                    f"got {threshold[:20]!r}")
        result = result_of(study_id)
        data = await run_in_threadpool(output_bytes, result, kind, engine.model, cut)
        name = result_tag(study_id, result) + SUFFIX[kind]
        return Response(data, media_type=MEDIA[kind],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    def slice_row(result: dict, row: int) -> int:
        if not 0 <= row < len(result["slices"]):
            raise ApiError(404, f"slice {row} does not exist: the series has {len(result['slices'])} slices")
        return row

    @app.get("/api/studies/{study_id}/slices/{row}/image.png")
    async def image(study_id: str, row: int, window: str | None = None):
        result = result_of(study_id)
        windows = result["windows"]
        if window is not None and window not in windows:
            raise ApiError(404, f"no window {window!r}: one of {', '.join(windows)}")
        channel = windows.index(window) if window else 0
        return _png(np.ascontiguousarray(result["images"][slice_row(result, row), :, :, channel]))

    @app.get("/api/studies/{study_id}/series/{index}/thumbnail.png")
    async def thumbnail(study_id: str, index: int):
        view = result_of(study_id).get("series_views", {}).get(index) or {}
        if not view.get("thumbnail"):
            raise ApiError(404, f"no picture of series {index}")
        return Response(view["thumbnail"], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/studies/{study_id}/slices/{row}/hu.png")
    async def hu(study_id: str, row: int):
        result = result_of(study_id)
        sources = result.get("sources")
        row = slice_row(result, row)
        if not sources:
            raise ApiError(404, "the series' files were not kept (too large): the viewer shows the cached windows")
        try:
            image = await run_in_threadpool(hu_png, sources[row])
        except Exception as exc:  # noqa: BLE001 - the file was read once by the study path; say so plainly
            log.info("hu.png: slice could not be decoded (%s)", type(exc).__name__)
            raise ApiError(404, "this slice could not be decoded at its source resolution") from None
        return _png(image, level=1)  # a 512-px slice: ~20 ms here instead of ~30, 10 % larger

    @app.get("/api/studies/{study_id}/slices/{row}/cam.png")
    async def cam(study_id: str, row: int, label: str = "any"):
        result = result_of(study_id)
        if label not in LABELS:
            raise ApiError(404, f"no label {label!r}: one of {', '.join(LABELS)}")
        heat = await run_in_threadpool(engine.cam, result, slice_row(result, row), label)
        return _png(heat_map(heat))

    return app
