"""A study's outputs: one registry of kind -> bytes, file name and media type.

predict.py --study writes every kind (`write_outputs`), the web app serves
each as a download (`KINDS[kind]`: its media type, the suffix of its file
name): one table, so the CLI and the web app cannot drift apart.
threshold (in (0, 1)): the per-slice CSV has it as a column, both CSVs say it
and the slices at or above it in a comment line, the JSON has it with the
runs of slices above it, the SR counts the slices at or above it.

Slice numbers: every output names a slice as the viewer does, `slice_number`
(1-based position in the series ordered by z, as the page scrolls it; "slice
N" in text), with the DICOM InstanceNumber beside it (`instance_number`,
empty where a file has none); each output says so (SLICE_NUMBERING). Why
not InstanceNumber alone: scanners number by acquisition, which need not
follow z, may repeat across series or be absent; the position is what the
page, the chart and the SR can all show for every slice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ich.cache import write_atomic
from ich.labels import LABELS

from .notice import NOTICE
from .result import StudyResult
from .sr_header import header_notes


SLICE_NUMBERING = ("slice_number is the 1-based position of the slice in its series ordered by z (foot to head), "
                   "as the web viewer shows it (slice N); instance_number is the DICOM InstanceNumber where present")


def instance_numbers(headers, n: int) -> list[int | None]:
    """Each row's DICOM InstanceNumber (None where absent or not a number); Nones when there are no headers."""
    out = []
    for h in (headers or [None] * n)[:n]:
        try:
            out.append(int(h.InstanceNumber) if h is not None and h.get("InstanceNumber") not in (None, "") else None)
        except (TypeError, ValueError):
            out.append(None)
    return out + [None] * (n - len(out))


def numbered(result: StudyResult) -> pd.DataFrame:
    """The per-slice table with slice_number and instance_number in place of the 0-based slice_index
    (rows are in z order: row i is slice i + 1)."""
    table = result.slices
    at = table.columns.get_loc("slice_index") if "slice_index" in table.columns else 0
    out = table.drop(columns=["slice_index"], errors="ignore")
    out.insert(at, "slice_number", np.arange(1, len(table) + 1))
    out.insert(at + 1, "instance_number", pd.array(instance_numbers(result.headers, len(table)), dtype="Int64"))
    return out


def _csv(frame: pd.DataFrame, *comments: str) -> bytes:
    """A CSV whose first lines are the notice and `comments` as comments (read it with pandas' `comment="#"`)."""
    head = "".join(f"# {c}\n" for c in (NOTICE, *comments))
    return (head + frame.to_csv(index=False, float_format="%.6g")).encode()


def runs(values, threshold: float) -> list[list[int]]:
    """[first, last] row ranges (0-based rows, inclusive) where values >= threshold."""
    out, start = [], None
    for i, v in enumerate(values):
        if v >= threshold and start is None:
            start = i
        if v < threshold and start is not None:
            out.append([start, i - 1])
            start = None
    if start is not None:
        out.append([start, len(values) - 1])
    return out


def above_threshold(table: pd.DataFrame, threshold: float) -> dict:
    """Per label: how many slices are at or above the threshold, and their runs as [first, last] slice numbers
    (1-based, inclusive, as the viewer shows them)."""
    return {lab: {"slices": int((table[lab] >= threshold).sum()),
                  "runs": [[a + 1, b + 1] for a, b in runs(table[lab].tolist(), threshold)]}
            for lab in LABELS}


def _threshold_line(table: pd.DataFrame, threshold: float) -> str:
    counts = above_threshold(table, threshold)
    return (f"threshold {threshold:g}: slices at or above it: "
            + ", ".join(f"{lab} {c['slices']}" for lab, c in counts.items()))


def study_document(result: StudyResult, model: dict | None = None, threshold: float = 0.5) -> dict:
    """The JSON output: notice, series, model, timings, threshold and the slices at or above it per label,
    per-slice probabilities (numbered as SLICE_NUMBERING says), every skipped file, and what the SR's header
    left out or normalised."""
    return {"notice": NOTICE, "series_id": result.series_id, "series": result.series,
            "experiments": result.experiments, "stage_two": result.stage_two, "model": model,
            "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
            "threshold": threshold, "slice_numbering": SLICE_NUMBERING,
            "above_threshold": above_threshold(result.slices, threshold),
            "slices": numbered(result).astype(object).where(lambda t: t.notna(), None).to_dict(orient="records"),
            "skipped": result.skipped, "header_notes": header_notes(result.headers)}


def _per_slice_csv(result: StudyResult, model, threshold: float) -> bytes:
    """The per-slice rows, numbered, with the threshold they were read at as a column (a row says what it was
    cut at)."""
    return _csv(numbered(result).assign(threshold=threshold), _threshold_line(result.slices, threshold),
                SLICE_NUMBERING)


def _kaggle_csv(result: StudyResult, model, threshold: float) -> bytes:
    """Kaggle's submission form keeps its two columns (ID, Label): the threshold is in its comment line."""
    table = result.slices
    long = table.melt(id_vars=["image_id"], value_vars=list(LABELS), var_name="label", value_name="Label")
    return _csv(long.assign(ID=long["image_id"] + "_" + long["label"])[["ID", "Label"]],
                _threshold_line(table, threshold))


def _json(result: StudyResult, model, threshold: float) -> bytes:
    return json.dumps(study_document(result, model, threshold), indent=1, default=str).encode()


def _sr(result: StudyResult, model, threshold: float) -> bytes:
    from .sr import build_sr, sr_bytes
    model = model or {"experiments": result.experiments, "folds": None, "stage_two": result.stage_two,
                      "oof_score": None}
    return sr_bytes(build_sr(result.headers, result.slices, model=model, threshold=threshold))


@dataclass(frozen=True)
class OutputKind:
    file_name: str       # predict.py --study's file; the web app's download is <result tag><suffix>
    suffix: str
    media_type: str
    make: Callable[[StudyResult, dict | None, float], bytes]


KINDS: dict[str, OutputKind] = {
    "csv": OutputKind("study.csv", ".csv", "text/csv", _per_slice_csv),
    "kaggle_csv": OutputKind("study_kaggle.csv", "_kaggle.csv", "text/csv", _kaggle_csv),
    "json": OutputKind("study.json", ".json", "application/json", _json),
    "sr": OutputKind("study_sr.dcm", "_sr.dcm", "application/dicom", _sr),
}


def output_bytes(result: StudyResult, kind: str, model: dict | None = None, threshold: float = 0.5) -> bytes:
    """One output of a study, as bytes: the CLI writes them, the web app serves them (one place for both)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if kind not in KINDS:
        raise ValueError(f"unknown study output {kind!r}: one of {', '.join(KINDS)}")
    return KINDS[kind].make(result, model, threshold)


def write_outputs(result: StudyResult, out_dir: Path, model: dict | None = None) -> dict:
    """Every kind into out_dir under its file name, atomically; {kind: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, spec in KINDS.items():
        data = output_bytes(result, kind, model)
        paths[kind] = out_dir / spec.file_name
        write_atomic(paths[kind], lambda p, d=data: p.write_bytes(d))
    return paths
