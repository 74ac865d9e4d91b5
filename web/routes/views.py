"""The viewer's images, each drawn in turn (web.render.Renders): a slice in one of the network's windows, a
slice at its source resolution in HU, a Grad-CAM heat map, a series' thumbnail. `?series=K` picks the
series (default the upload's chosen one)."""
from __future__ import annotations

import logging

import numpy as np
from fastapi import APIRouter, Depends, Response

from ich.labels import LABELS
from pipeline.result import StudyResult

from ..deps import Server, series_param, series_result, server, stored_study
from ..errors import ApiError
from ..render import heat_map, hu_image, png
from ..schemas import ERRORS
from ..store import StoredStudy

router = APIRouter(prefix="/api/studies/{study_id}", responses=ERRORS)
log = logging.getLogger("ich.web")


def image_response(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def slice_row(result: StudyResult, row: int) -> int:
    if not 0 <= row < len(result.slices):
        raise ApiError(404, f"slice {row} does not exist: the series has {len(result.slices)} slices")
    return row


@router.get("/slices/{row}/image.png")
async def image(row: int, window: str | None = None, result: StudyResult = Depends(series_result),
                srv: Server = Depends(server)):
    """One slice in one of the cache's windows, as the network saw it (8-bit)."""
    if window is not None and window not in result.windows:
        raise ApiError(404, f"no window {window!r}: one of {', '.join(result.windows)}")
    channel = result.windows.index(window) if window else 0
    picture = np.ascontiguousarray(result.images[slice_row(result, row), :, :, channel])
    return image_response(await srv.renders.run(png, picture))


@router.get("/slices/{row}/hu.png")
async def hu(row: int, result: StudyResult = Depends(series_result), srv: Server = Depends(server)):
    """The slice at its source resolution in HU: an RGB PNG whose red and green bytes are HU + 32768 (high,
    low). 404 when the server did not keep the series' files (web.render, pipeline.study.SOURCE_*)."""
    row = slice_row(result, row)
    sources = result.sources
    if not sources:
        raise ApiError(404, "the series' files were not kept (too large): the viewer shows the cached windows")
    try:
        return image_response(await srv.renders.run(lambda: png(hu_image(sources[row]), level=1)))
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - the file was read once by the study path; say so plainly
        log.info("hu.png: slice could not be decoded (%s)", type(exc).__name__)
        raise ApiError(404, "this slice could not be decoded at its source resolution") from None


@router.get("/slices/{row}/cam.png")
async def cam(row: int, label: str = "any", series: int | None = Depends(series_param),
              study: StoredStudy = Depends(stored_study), result: StudyResult = Depends(series_result),
              srv: Server = Depends(server)):
    """Its Grad-CAM as an RGBA heat map (alpha = attention), to lay over the image."""
    if label not in LABELS:
        raise ApiError(404, f"no label {label!r}: one of {', '.join(LABELS)}")
    row = slice_row(result, row)
    key = (study.chosen if series is None else series, row, label)
    data = await srv.renders.run(study.cam, key, lambda: png(heat_map(srv.engine.cam(result, row, label))))
    srv.store.fit()
    return image_response(data)


@router.get("/series/{index}/thumbnail.png")
async def thumbnail(index: int, study: StoredStudy = Depends(stored_study)):
    """The series list's picture of a series (its middle slice, brain window), for the series with a result."""
    data = study.thumbnails.get(index)
    if not data:
        raise ApiError(404, f"no picture of series {index}")
    return image_response(data)
