"""GET /api/studies/{id}/download/{kind}: the outputs of `predict.py --study` (pipeline.outputs), at the page's
threshold, named by the result's tag, the series when not the chosen one, and the threshold; never by
patient data."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from pipeline.outputs import KINDS, output_bytes
from pipeline.result import StudyResult

from ..deps import Server, series_param, series_result, server, stored_study, threshold_param
from ..errors import ApiError
from ..schemas import ERRORS
from ..store import StoredStudy
from .studies import result_tag

router = APIRouter(prefix="/api/studies/{study_id}", responses=ERRORS)


def threshold_tag(cut: float) -> str:
    """'t0.30' (two decimals when they say it all, else every digit: 't0.125')."""
    return f"t{cut:.2f}" if abs(cut * 100 - round(cut * 100)) < 1e-9 else f"t{cut:g}"


def download_name(study_id: str, study: StoredStudy, series: int | None, cut: float, kind: str) -> str:
    part = f"_series{series}" if series is not None and series != study.chosen else ""
    return f"{result_tag(study_id, study)}{part}_{threshold_tag(cut)}{KINDS[kind].suffix}"


@router.get("/download/{kind}")
async def download(study_id: str, kind: str, cut: float = Depends(threshold_param),
                   series: int | None = Depends(series_param), study: StoredStudy = Depends(stored_study),
                   result: StudyResult = Depends(series_result), srv: Server = Depends(server)):
    if kind not in KINDS:
        raise ApiError(404, f"no output {kind!r}: one of {', '.join(KINDS)}")
    data = await srv.renders.run(output_bytes, result, kind, srv.engine.model, cut)
    name = download_name(study_id, study, series, cut, kind)
    return Response(data, media_type=KINDS[kind].media_type,
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
