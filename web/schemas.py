"""The JSON API's response models (FastAPI checks each answer against them and /api/openapi.json lists them)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    error: str  # one plain sentence that says what to do


class Health(BaseModel):
    ok: bool
    model: dict
    studies_in_memory: int
    notice: str


class Forgotten(BaseModel):
    forgotten: bool


class Patient(BaseModel):
    patient_name: str | None
    patient_id: str | None


class SeriesEntry(BaseModel):
    index: int
    series_id: str
    description: str | None
    n_files: int
    n_slices: int          # slices predicted (0 when the series has no result)
    axial: bool
    usable: bool
    reason: str | None     # why a series has no result
    chosen: bool           # the upload's chosen series (the default of ?series=)
    why_chosen: str | None
    has_result: bool       # ?series=index answers
    thumbnail: bool


class SliceRow(BaseModel):
    model_config = ConfigDict(extra="allow")  # the six labels' probabilities
    row: int
    file: str
    slice_index: int
    z: float


class StudyDocument(BaseModel):
    id: str
    tag: str
    created: float
    series_index: int      # whose results these are
    study: dict
    window_levels: list[dict]
    source_images: bool
    notice: str
    labels: list[str]
    subtypes: list[str]
    series: list[SeriesEntry]
    slices: list[SliceRow]
    skipped: list[dict]
    windows: list[str]
    image_size: int
    timings_s: dict[str, float]
    model: dict


ERRORS = {code: {"model": ErrorBody} for code in (400, 403, 404, 408, 411, 413, 422, 500, 503)}
