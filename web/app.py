"""serve.py's web application and its JSON API (FastAPI), on the study path of predict.py.

API (the page uses nothing else):
- `POST /api/studies[?series=N]`: multipart form, field `files`: one .zip or
  several DICOM files of one study. -> 201 and the result (below). `series`
  picks another CT series of the same files by its index in `series`.
- `GET /api/studies/{id}`: the result again.
- `GET /api/studies/{id}/download/{csv|kaggle_csv|json|sr}[?threshold=T]`:
  the outputs of `predict.py --study`, from the same code
  (pipeline.outputs), at the page's threshold T in (0, 1) (default
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
  keep the series' files (larger than pipeline.study.SOURCE_BYTES).
- `GET /api/studies/{id}/slices/{row}/cam.png?label=subdural`: its Grad-CAM
  as an RGBA heat map (alpha = attention), to lay over the image.
- `DELETE /api/studies/{id}`: forget a result now. `GET /api/health`.
Errors are JSON `{"error": "..."}` in one line with 400 (the upload, or a
refused request), 403 (another page's Origin), 404, 408 (an upload that
stalls), 411/413 (size), 503 (queue full), 500 (the model side; logged
without patient data). They name reasons and files as uploaded, never a
server path.

Safety (README "What happens to bad input"): web.guard checks Host and
Origin and sets the security headers; each upload is streamed into its own
folder under one server-owned folder (web.uploads), counted as it arrives,
and deleted when the request ends, on error too, or at the next start after
a crash. The files are then read and sorted out (zip members sniffed before
they are written, headers read) in a small pool of workers with caps on
bytes and time, before the upload waits for the model, so a hostile upload
never holds the model's lock. Results live in memory only (web.store). File
names in the folder are numbers; the uploaded names are only reported back.
Nothing with patient data (names, IDs, UIDs, file names) is logged: log lines
say counts and timings.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import math
import re
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import cv2
import numpy as np
import pydicom
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from ich.labels import LABELS, SUBTYPES
from ich.study import MAX_FILES, Deadline, StudyError, choose_series, unpack_zip
from models.predict_split import InferenceError
from pipeline.notice import NOTICE
from pipeline.outputs import KINDS, output_bytes
from pipeline.study import check_chosen

from .engine import Busy, WebEngine
from .guard import Guard, csp
from .store import StudyStore
from .uploads import ClientGone, UploadError, WorkDir, receive_files, safe_name

HERE = Path(__file__).resolve().parent
log = logging.getLogger("ich.web")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_safe_name = safe_name  # the uploaded name, for reporting only (web.uploads)


class _Until(Deadline):
    """A Deadline that also ends when the server stops, so a worker never holds a shutdown up."""

    def __init__(self, seconds: float, stopping: threading.Event):
        super().__init__(seconds)
        self.stopping = stopping

    def check(self) -> None:
        if self.stopping.is_set():
            raise StudyError("the server is stopping")
        super().check()


def read_study(listed: list, work: Path, series: int | None, *, max_unpacked: int, seconds: float,
               stopping: threading.Event | None = None):
    """The uploaded files -> ich.study.StudyFiles, in a triage worker: one zip is unpacked with its
    members sniffed first (a member that is no DICOM is never written), every header is read, and the
    whole takes at most `seconds`; StudyError says why a study cannot be used."""
    deadline, skipped, what = _Until(seconds, stopping or threading.Event()), [], "the upload"
    if len(listed) == 1 and zipfile.is_zipfile(listed[0][1]):
        name, path = listed[0]
        listed, skipped = unpack_zip(path, work, max_bytes=max_unpacked, deadline=deadline, name=name)
        what = name
    elif len(listed) == 1 and listed[0][0].lower().endswith(".zip"):
        raise StudyError(f"{listed[0][0]} is not a readable zip file")
    files = choose_series(listed, series_index=series, skipped=skipped, deadline=deadline)
    check_chosen(files, what)
    return files


def _inline_script_hashes(html: bytes) -> list[str]:
    """'sha256-...' of each inline <script> of the page, for its Content-Security-Policy."""
    return ["sha256-" + base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
            for m in re.finditer(rb"<script>(.*?)</script>", html, re.S)]


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


def create_app(engine: WebEngine, *, max_upload_mb: int = 1024, max_studies: int = 8,
               allowed_hosts: set[str] | None = frozenset({"127.0.0.1", "localhost", "::1"}),
               work: WorkDir | None = None, max_unpacked_mb: int = 2048, read_seconds: float = 120,
               body_timeout: float = 30, triage_workers: int = 2) -> FastAPI:
    """allowed_hosts: Host names answered (None: any; web.guard). work: the server's folder for uploads
    (default: one per user in the system's temporary folder). max_unpacked_mb: bytes a zip may unpack
    to, per upload. read_seconds: time to read and sort out one upload's files. body_timeout: seconds
    an upload may stall. triage_workers: uploads read at once (outside the model's lock)."""
    # no /api/docs: FastAPI's docs page loads its script from a public CDN, which an offline machine
    # cannot reach and the page's Content-Security-Policy does not allow; the schema stays
    stopping = threading.Event()

    @asynccontextmanager
    async def lifespan(app):
        yield
        stopping.set()  # a triage worker stops at its next file
        triage.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ICH study viewer (research use only)", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.add_middleware(Guard, allowed_hosts=None if allowed_hosts is None else set(allowed_hosts))
    store = StudyStore(max_studies)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    work = work or WorkDir()
    engine.work_dir = work.root
    triage = ThreadPoolExecutor(max_workers=triage_workers, thread_name_prefix="ich-triage")
    app.state.engine, app.state.store, app.state.work = engine, store, work
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
        page = templates.TemplateResponse(request, "index.html", {
            "notice": NOTICE, "model": engine.model, "max_upload_mb": max_upload_mb, "labels": list(LABELS)})
        page.headers["Content-Security-Policy"] = csp(_inline_script_hashes(page.body))
        return page

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
        try:
            engine.check_room()
        except Busy as exc:
            raise ApiError(503, str(exc)) from None
        with work.request() as folder:
            try:
                listed = await receive_files(request, folder, max_bytes=max_bytes, max_files=MAX_FILES,
                                             body_timeout=body_timeout)
            except ClientGone:
                log.info("upload: the client went away before the upload ended")
                return Response(status_code=400)
            except UploadError as exc:
                raise ApiError(exc.status, exc.message) from None
            if not listed:
                raise ApiError(400, "no complete file in the upload (an upload cut short arrives without "
                                    "its files): send one .zip or the DICOM files of one study in the form "
                                    "field 'files'")
            received = time.time() - t0
            try:
                t = time.time()
                files = await asyncio.wrap_future(triage.submit(
                    read_study, listed, folder / "unzipped", series, max_unpacked=max_unpacked_mb << 20,
                    seconds=read_seconds, stopping=stopping))
                triaged = time.time() - t
                result = await run_in_threadpool(engine.run, files, work_dir=folder)
            except StudyError as exc:
                raise ApiError(400, " ".join(str(exc).replace(str(work.root), "(server folder)").split())) from None
            except Busy as exc:
                raise ApiError(503, str(exc)) from None
            except InferenceError as exc:
                log.error("inference failed: %s", type(exc).__name__)
                raise ApiError(500, "the model could not run on this study") from None
        result["timings"]["read"] = triaged + result["timings"].get("read", 0)
        result["timings"] = {"upload": received, **result["timings"], "total": time.time() - t0}
        result["created"] = time.time()
        study_id = store.add(result)
        log.info("study: %d slices, %d files skipped, %.2f s", len(result["slices"]), len(result["skipped"]),
                 result["timings"]["total"])
        return public_result(study_id, result, engine.model)

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
        if kind not in KINDS:
            raise ApiError(404, f"no output {kind!r}: one of {', '.join(KINDS)}")
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
        name = result_tag(study_id, result) + KINDS[kind].suffix
        return Response(data, media_type=KINDS[kind].media_type,
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


def quiet_logs() -> None:
    """Libraries that would log patient data: highdicom says at INFO which dataset it copies the patient
    module from (a SOPInstanceUID); uvicorn's access log would carry paths. Warnings and up only."""
    for name in ("highdicom", "pydicom", "uvicorn.access", "python_multipart", "multipart"):
        logging.getLogger(name).setLevel(logging.WARNING)
