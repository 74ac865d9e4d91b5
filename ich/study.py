"""One study in (a folder or a .zip of DICOM files, any layout): its files, sorted into the one
series the models read and the rest, each with a reason.

The DICOM side of the study path (models.study runs the models). A study
from a scanner or a PACS export holds several series (axial and reformatted
planes, scouts, dose reports) and non-image files; the networks were trained
on axial head-CT slices, so exactly one series is chosen: among the CT series
whose slices are axial (slice normal within about 30 degrees of the patient's
head-foot axis, which allows tilted gantries), the one with the most slices.
Every other file gets a reason in the vocabulary of rejected.csv
(ich.dicom.REASONS), plus `other_series` for readable slices of a series
that was not chosen. Headers are read with the same ich.dicom code as
prepare_data, with its caps.

A zip is extracted with caps on entries and bytes and no path outside the
target folder (no zip-slip): StudyError names what was refused.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .dicom import MAX_PIXELS, REASONS, Rejected, read_header

OTHER_SERIES = "other_series"  # a readable slice of a series that was not chosen (prepare_data never uses it)
STUDY_REASONS = (*REASONS, OTHER_SERIES)
AXIAL_MIN_COS = 0.85   # |normal . head-foot axis|: up to about 32 degrees of gantry tilt
MAX_FILES = 5000       # a head CT study holds a few hundred slices per series
MAX_BYTES = 4 << 30    # uncompressed


class StudyError(ValueError):
    """The study cannot be read at all; the message says why."""


@dataclass
class StudyFiles:
    chosen: list[dict]                   # {file, path, image_id} of each slice of the chosen series
    series_id: str | None
    skipped: list[dict] = field(default_factory=list)  # {file, reason, detail} for every other file
    series: list[dict] = field(default_factory=list)   # {series_id, n_files, axial} of each CT series
    samples: dict = field(default_factory=dict)         # series_id -> path of one of its files (a thumbnail's)


def extract_zip(path: Path, target: Path, *, max_files: int | None = None, max_bytes: int | None = None) -> Path:
    """Extract a study zip into target with caps (default MAX_FILES, MAX_BYTES); refuse climbing member names."""
    max_files = MAX_FILES if max_files is None else max_files
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StudyError(f"{path.name} is not a readable zip file ({exc})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise StudyError(f"{path.name} holds {len(members)} files; at most {max_files} are read")
        if sum(m.file_size for m in members) > max_bytes:
            raise StudyError(f"{path.name} unpacks to more than {max_bytes >> 20} MB: refused")
        for m in members:
            name = PurePosixPath(m.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts:
                raise StudyError(f"{path.name} holds an unsafe path {m.filename!r}: refused")
        target.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(members):  # numbered: names may repeat across folders, or be odd
            with archive.open(m) as src, open(target / f"{i:05d}", "wb") as dst:
                left = m.file_size + 1
                while chunk := src.read(1 << 20):  # the header's size may lie: count what comes out
                    left -= len(chunk)
                    if left < 0:
                        raise StudyError(f"{path.name}: {m.filename} is larger than its header says: refused")
                    dst.write(chunk)
    return target


def study_files(path: Path, work: Path) -> list[tuple[str, Path]]:
    """(name to report, path to read) of every file of a study folder or zip."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [m.filename for m in archive.infolist() if not m.is_dir()]
        folder = extract_zip(path, work / "unzipped")
        return [(name, folder / f"{i:05d}") for i, name in enumerate(names)]
    if path.is_file() and path.suffix.lower() == ".zip":
        raise StudyError(f"{path.name} is not a readable zip file")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if not p.is_dir())
        if len(files) > MAX_FILES:
            raise StudyError(f"{path} holds {len(files)} files; at most {MAX_FILES} are read")
        return [(str(p.relative_to(path)), p) for p in files]
    if path.is_file():
        return [(path.name, path)]
    raise StudyError(f"{path} not found: give a folder or a .zip of one study's DICOM files")


def _is_axial(orientation) -> bool:
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(normal)
    return bool(norm > 0 and abs(normal[2]) / norm >= AXIAL_MIN_COS)


def choose_series(files: list[tuple[str, Path]], *, max_pixels: int = MAX_PIXELS,
                  series_index: int | None = None) -> StudyFiles:
    """Read every header; keep one CT series, give every other file a reason.

    The series list is ordered axial first, then by slice count (most
    first), then by UID, so `series_index` (0 = the automatic choice when an
    axial series exists) names the same series on a second upload of the same
    files without a UID travelling through a URL. By default the axial series
    with the most slices is kept; a user may pick another CT series by its
    index (a non-axial one is out of what the networks saw, and
    `StudyFiles.series[i]["axial"]` says so).
    """
    by_series, skipped = {}, []
    for name, path in files:
        try:
            header = read_header(path, max_pixels=max_pixels)
        except Rejected as exc:
            skipped.append({"file": name, "reason": exc.reason, "detail": exc.detail})
            continue
        by_series.setdefault(header.series_id, []).append((name, path, header))
    series = [{"series_id": s, "n_files": len(v), "axial": all(_is_axial(h.orientation) for _, _, h in v)}
              for s, v in by_series.items()]
    series.sort(key=lambda s: (not s["axial"], -s["n_files"], s["series_id"]))
    for i, s in enumerate(series):
        s["index"] = i
    if series_index is not None:
        if not 0 <= series_index < len(series):
            raise StudyError(f"series {series_index} does not exist: the study has {len(series)} CT series "
                             f"(0 to {len(series) - 1})")
        best = series[series_index]["series_id"]
    elif series and series[0]["axial"]:
        best = series[0]["series_id"]
    else:
        return StudyFiles([], None, skipped + [
            {"file": n, "reason": OTHER_SERIES, "detail": "not an axial series"}
            for v in by_series.values() for n, _, _ in v], series)
    for s, v in by_series.items():
        if s != best:
            why = "another series was chosen" if series_index is not None else (
                "another axial series has more slices" if _is_axial(v[0][2].orientation) else "not axial")
            skipped += [{"file": n, "reason": OTHER_SERIES, "detail": why} for n, _, _ in v]
    samples = {}
    for s, v in by_series.items():  # the middle slice along z: what a series list shows of each series
        ordered = sorted(v, key=lambda f: f[2].z)
        samples[s] = ordered[len(ordered) // 2][1]
    chosen, seen = [], set()
    for name, path, header in by_series[best]:
        if header.image_id in seen:
            skipped.append({"file": name, "reason": "duplicate_id", "detail": f"{header.image_id} seen before"})
            continue
        seen.add(header.image_id)
        chosen.append({"file": name, "path": path, "image_id": header.image_id})
    return StudyFiles(chosen, best, skipped, series, samples)
