"""Uploads and their results: POST /api/studies, GET / DELETE /api/studies/{id}, GET .../patient."""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from ich.labels import LABELS, SUBTYPES
from ich.study import MAX_FILES, StudyError
from models.predict_split import InferenceError
from pipeline.notice import NOTICE
from pipeline.result import StudyResult
from pipeline.study import thumbnail

from ..deps import Server, series_param, server, stored_study
from ..engine import Busy
from ..errors import ApiError
from ..reader import Caps, ReadFailed, ReadStopped
from ..schemas import ERRORS, Forgotten, Patient, StudyDocument
from ..store import StoredStudy
from ..uploads import ClientGone, UploadError, receive_files

router = APIRouter(prefix="/api/studies", responses=ERRORS)
log = logging.getLogger("ich.web")


def result_tag(study_id: str, study: StoredStudy) -> str:
    """A short name for a result's downloads: part of its random id and the day it was made; no patient data."""
    day = time.strftime("%Y%m%d", time.localtime(study.created))
    return f"ich_{re.sub(r'[^A-Za-z0-9]', '', study_id)[:8]}_{day}"


def _text(header, key: str) -> str | None:
    value = header.get(key) if header is not None else None
    return " ".join(str(value).split())[:120] or None if value not in (None, "") else None


def study_header(result: StudyResult) -> dict:
    """The viewer's study header, from the series' first slim header: no patient name or ID here."""
    first = result.headers[0] if result.headers else None
    date = _text(first, "StudyDate")
    if date and re.fullmatch(r"\d{8}", date):
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    try:
        thickness = float(first.get("SliceThickness")) if first is not None and first.get("SliceThickness") else None
    except (TypeError, ValueError):
        thickness = None
    z = result.slices["z"].to_numpy(dtype=float)
    spacing = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else None
    return {"study_date": date, "series_description": _text(first, "SeriesDescription"),
            "modality": _text(first, "Modality"), "slice_thickness_mm": thickness,
            "slice_spacing_mm": round(spacing, 3) if spacing is not None and math.isfinite(spacing) else None,
            "n_slices": len(result.slices),
            "source_size": [int(first.Rows), int(first.Columns)] if first is not None and "Rows" in first else None}


def study_document(study_id: str, study: StoredStudy, index: int, model: dict) -> dict:
    """What the page needs of one series' results (top level) and the upload's series list."""
    result = study.results[index]
    table = result.slices
    return {
        "id": study_id, "tag": result_tag(study_id, study), "created": study.created, "series_index": index,
        "study": study_header(result), "window_levels": result.window_levels,
        "source_images": bool(result.sources), "notice": NOTICE, "labels": list(LABELS),
        "subtypes": list(SUBTYPES),
        "series": [{**{k: s[k] for k in ("index", "series_id", "description", "n_files", "axial", "usable",
                                          "reason")},
                    "n_slices": len(study.results[s["index"]].slices) if s["index"] in study.results else 0,
                    "chosen": s["index"] == study.chosen,
                    "why_chosen": s.get("why_chosen") if s["index"] == study.chosen else None,
                    "has_result": s["index"] in study.results, "thumbnail": s["index"] in study.thumbnails}
                   for s in study.series],
        "slices": [{"row": i, "file": r["file"], "slice_index": int(r["slice_index"]), "z": float(r["z"]),
                    **{label: float(r[label]) for label in LABELS}} for i, r in enumerate(table.to_dict("records"))],
        "skipped": result.skipped, "windows": result.windows, "image_size": int(result.images.shape[1]),
        "timings_s": {k: round(v, 3) for k, v in {**study.timings, **result.timings}.items()}, "model": model,
    }


@router.post("", status_code=201, response_model=StudyDocument)
async def upload(request: Request, series: int | None = Depends(series_param), srv: Server = Depends(server)):
    """multipart form, field `files`: one .zip or several DICOM files of one study -> 201 and the result of
    the chosen series (`series`: pick another by its index in the series list)."""
    t0 = time.time()
    cfg = srv.settings
    length = request.headers.get("content-length")
    if length is None:
        raise ApiError(411, "the upload must state its size (Content-Length)")
    if not length.isdigit():
        raise ApiError(400, "the upload's Content-Length is not a number")
    if int(length) > cfg.max_upload_mb << 20:
        raise ApiError(413, f"the upload is larger than {cfg.max_upload_mb} MB")
    try:
        srv.engine.check_room()
    except Busy as exc:
        raise ApiError(503, str(exc), retry_after=30) from None
    async with srv.uploads.slot(int(length)):
        return await _upload(request, series, srv, t0, int(length))


async def _upload(request: Request, series: int | None, srv: Server, t0: float, length: int) -> dict:
    cfg = srv.settings
    with srv.work.request() as folder:
        try:
            listed = await asyncio.wait_for(receive_files(
                request, folder, max_bytes=cfg.max_upload_mb << 20, max_files=MAX_FILES,
                body_timeout=cfg.body_timeout, pace=lambda: srv.uploads.yield_to_smaller(length)),
                cfg.upload_seconds)
        except ClientGone:
            log.info("upload: the client went away before the upload ended")
            return Response(status_code=400)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the upload took more than {cfg.upload_seconds:g} s to arrive: send it again "
                                "on a faster connection, or fewer files") from None
        except UploadError as exc:
            raise ApiError(exc.status, exc.message) from None
        if not listed:
            raise ApiError(400, "no complete file in the upload (an upload cut short arrives without its files): "
                                "send one .zip or the DICOM files of one study in the form field 'files'")
        received = time.time() - t0
        caps = Caps(cfg.max_unpacked_mb << 20, cfg.read_seconds, cfg.upload_memory_mb << 20, cfg.max_series,
                    cfg.max_source_mpx * 10**6)
        try:
            async with srv.uploads.turn(length) as turn:  # the body is in: a turn to read and predict it
                t_read = time.time()
                read = await run_in_threadpool(srv.reader.read, listed, folder / "unzipped", series, caps, turn)
                t_again = time.time()
                await turn.again()  # a slow read gave its turn back: the models wait for one
                t_run = time.time()
                results = await run_in_threadpool(srv.engine.run, read)
                t_done = time.time()
        except StudyError as exc:
            raise ApiError(400, str(exc).replace(str(srv.work.root), "(server folder)")) from None
        except ReadStopped as exc:
            raise ApiError(503, str(exc), retry_after=30) from None
        except ReadFailed as exc:
            log.error("upload: reading failed: %s", exc)
            raise ApiError(400, "the files could not be read (an unexpected error while reading them)") from None
        except Busy as exc:
            raise ApiError(503, str(exc), retry_after=30) from None
        except InferenceError as exc:
            log.error("inference failed: %s", type(exc).__name__)
            raise ApiError(500, "the model could not run on this study") from None
    listing = read.series
    for s in listing:
        if s["index"] == read.chosen:
            s["why_chosen"] = ("picked on upload (?series=)" if series is not None
                               else "the axial series with the most slices")
    # "upload": from the request to its body in (a wait for room included); "turn": the wait for a turn
    # (and, after a slow read that gave it back, the wait for one again); "read" (the reading process's own
    # time) is within "reading" (from its start to its answer here); "models" holds the model's "queue",
    # "stage one" and "stage two"
    study = StoredStudy(results, listing, read.chosen, {"upload": received,
                                                        "turn": t_read - t0 - received + t_run - t_again,
                                                        "reading": t_again - t_read,
                                                        "models": t_done - t_run, "total": time.time() - t0},
                        {i: png for i, r in results.items() if (png := thumbnail(r.images)) is not None})
    study_id = srv.store.add(study)
    chosen = results[read.chosen]
    log.info("study: %d series predicted, %d slices in the chosen one, %d files skipped, %.2f s",
             len(results), len(chosen.slices), len(chosen.skipped), study.timings["total"])
    return study_document(study_id, study, read.chosen, srv.engine.model)


@router.get("/{study_id}", response_model=StudyDocument)
async def get_study(study_id: str, series: int | None = Depends(series_param),
                    study: StoredStudy = Depends(stored_study), srv: Server = Depends(server)):
    """The result again; `?series=K`: the same document with series K's results at the top level."""
    index = study.chosen if series is None else series
    if index not in study.results:
        raise ApiError(404, f"series {index} of this study has no result (see the series list: `has_result`, "
                            "`reason`)")
    return study_document(study_id, study, index, srv.engine.model)


@router.delete("/{study_id}", response_model=Forgotten)
async def forget(study_id: str, srv: Server = Depends(server)):
    """Forget a result now."""
    if not srv.store.forget(study_id):
        raise ApiError(404, "no such study here")
    return {"forgotten": True}


@router.get("/{study_id}/patient", response_model=Patient)
async def patient(study: StoredStudy = Depends(stored_study)):
    """Patient name and ID, for the page to show only when the user asks (never in a URL, never logged)."""
    headers = study.result().headers or [None]
    return {"patient_name": _text(headers[0], "PatientName"), "patient_id": _text(headers[0], "PatientID")}
