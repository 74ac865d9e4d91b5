"""One study in (a folder or a .zip of DICOM files, any layout): its files, sorted into the one
series the models read and the rest, each with a reason.

The DICOM side of the study path (pipeline.study runs the models). A study
from a scanner or a PACS export holds several series (axial and reformatted
planes, scouts, dose reports) and non-image files; the networks were trained
on axial head-CT slices, so exactly one series is chosen: among the CT series
whose slices are axial (slice normal within about 30 degrees of the patient's
head-foot axis, which allows tilted gantries), the one with the most slices.
Every other file gets a reason in the vocabulary of rejected.csv
(ich.dicom.REASONS), plus `other_series` for readable slices of a series
that was not chosen. Headers are read with the same ich.dicom code as
prepare_data, with its caps.

A zip is read in place, never extracted: each member is read from the
archive where it is used (ich.rawdata.Member, as the competition zip), with
caps on entries and bytes and no climbing name (no zip-slip): StudyError
names what was refused. Members that are no DICOM by their first bytes
(ich.dicom.sniff) are listed as `not_dicom` without being inflated further,
so a zip of zeros costs no disk and no parse; a damaged zip (bad signature
or CRC, an entry longer than its header says, encryption, deflate64) is a
one-line StudyError that names the problem, never a member. A `Deadline` bounds the time one study may take to
be read.
"""
from __future__ import annotations

import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .dicom import (MAX_PIXELS, REASONS, SNIFF_BYTES, Rejected, max_file_bytes, read_header, sniff,
                    spans_a_plane)
from .rawdata import Member, readable

OTHER_SERIES = "other_series"  # a readable slice of a series that was not chosen (prepare_data never uses it)
OTHER_PLANE = "other_plane"    # a slice of the chosen series in another plane than the rest of it
STUDY_REASONS = (*REASONS, OTHER_SERIES, OTHER_PLANE)
SAME_PLANE_COS = 0.99  # |normal . series normal|: within about 8 degrees
AXIAL_MIN_COS = 0.85   # |normal . head-foot axis|: up to about 32 degrees of gantry tilt
MAX_FILES = 5000       # a head CT study holds a few hundred slices per series
MAX_BYTES = 4 << 30    # uncompressed


class StudyError(ValueError):
    """The study cannot be read at all; the message says why."""


class Deadline:
    """The time one study may take to be read; `check` raises StudyError once it has passed."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise StudyError(f"reading the study took more than {self.seconds:g} s: refused (a study of a few "
                             "hundred slices takes seconds)")


NO_DEADLINE = Deadline(None)


def reason_summary(skipped: list[dict], examples: int = 3) -> str:
    """'3 not_dicom (a.txt, b.jpg, c.pdf, ...), 39 other_series (...)': counts per reason, most first, with
    a few file names as given; '' when nothing was skipped."""
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s["reason"], []).append(str(s["file"]))
    parts = []
    for reason, n in Counter(s["reason"] for s in skipped).most_common():
        names = by_reason[reason][:examples]
        more = ", ..." if n > len(names) else ""
        parts.append(f"{n} {reason} ({', '.join(names)}{more})")
    return ", ".join(parts)


@dataclass
class StudyFiles:
    chosen: list[dict]                   # {file, path, image_id} of each slice of the chosen series
    series_id: str | None
    skipped: list[dict] = field(default_factory=list)  # {file, reason, detail} for every other file
    series: list[dict] = field(default_factory=list)   # {series_id, n_files, axial} of each CT series
    samples: dict = field(default_factory=dict)         # series_id -> path of one of its files (a thumbnail's)


def _zip_problem(exc: BaseException) -> str:
    """What is wrong with a damaged zip, in words, without a member name."""
    text = str(exc).lower()
    if isinstance(exc, NotImplementedError) or "compression method" in text:
        return "an entry uses a compression method that is not supported (deflate64?): zip it again with deflate"
    if "encrypted" in text or "password" in text:
        return "an entry is encrypted"
    if "crc" in text:
        return "an entry's data does not match its CRC (damaged)"
    if "magic number" in text or "signature" in text:
        return "an entry's header signature is damaged"
    if "overlapped" in text:
        return "entries overlap (a crafted zip)"
    if isinstance(exc, (EOFError, zlib.error)):
        return "an entry's compressed data is damaged or cut short"
    return "it is damaged"


def zip_members(path: Path, *, max_files: int | None = None, max_bytes: int | None = None,
                deadline: Deadline = NO_DEADLINE, name: str | None = None) -> tuple[list, list]:
    """A study zip read in place: ([(member name, ich.rawdata.Member)], [skipped: {file, reason, detail}]).

    Nothing is extracted: each member is a Member (the reader of the
    competition zip: its offset in the archive, read and CRC checked where
    it is used), so a study costs no disk beyond its zip. The members are
    checked once here, as the extraction checked them: caps (default
    MAX_FILES, MAX_BYTES) on entries, on bytes declared and on bytes that
    actually come out (a header may lie); climbing names refused; a damaged
    zip (signature, CRC, sizes, encryption, method) a one-line StudyError;
    members that are no DICOM by their first bytes skipped with their reason,
    never inflated further. A member larger than any slice within MAX_PIXELS
    is skipped as `too_large` unread. name: the zip's name in messages.
    """
    max_files = MAX_FILES if max_files is None else max_files
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    name = name or Path(path).name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise StudyError(f"{name} is not a readable zip file ({_zip_problem(exc)})") from None
    files, skipped, seen = [], [], 0
    where = str(Path(path).resolve())
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise StudyError(f"{name} holds no files")
        if len(members) > max_files:
            raise StudyError(f"{name} holds {len(members)} files; at most {max_files} are read")
        if sum(m.file_size for m in members) > max_bytes:
            raise StudyError(f"{name} unpacks to more than {max_bytes >> 20} MB: refused")
        for m in members:
            parts = PurePosixPath(m.filename.replace("\\", "/"))
            if parts.is_absolute() or ".." in parts.parts:
                raise StudyError(f"{name} holds an unsafe path {m.filename!r}: refused")
            if m.flag_bits & 0x1:
                raise StudyError(f"{name} cannot be read: {_zip_problem(RuntimeError('encrypted'))}")
        try:
            for m in members:
                deadline.check()
                if m.file_size > max_file_bytes(MAX_PIXELS):
                    skipped.append({"file": m.filename, "reason": "too_large",
                                    "detail": f"{m.file_size:,} bytes, more than a slice takes"})
                    continue
                with archive.open(m) as src:
                    head = src.read(SNIFF_BYTES)
                    try:
                        sniff(head)
                    except Rejected as rej:
                        skipped.append({"file": m.filename, "reason": rej.reason, "detail": rej.detail})
                        continue
                    left = m.file_size + 1
                    chunk = head
                    while chunk:  # the header's size may lie: count what comes out; zipfile checks the CRC
                        left -= len(chunk)
                        seen += len(chunk)
                        if left < 0:
                            raise StudyError(f"{name}: an entry is larger than its header says: refused")
                        if seen > max_bytes:
                            raise StudyError(f"{name} unpacks to more than {max_bytes >> 20} MB: refused")
                        deadline.check()
                        chunk = src.read(1 << 20)
                files.append((m.filename, Member(where, m.filename, m.header_offset, m.compress_size,
                                                 m.file_size, m.CRC, m.compress_type, m.flag_bits)))
        except StudyError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError,
                ValueError) as exc:
            raise StudyError(f"{name} cannot be read: {_zip_problem(exc)}") from None
    return files, skipped


def unpack_zip(path: Path, work: Path | None = None, **caps) -> tuple[list, list]:
    """zip_members by its former name (the web app's reader calls it): nothing is unpacked, `work` is unused."""
    return zip_members(path, **caps)


def study_files(path: Path, work: Path | None = None, skipped: list | None = None, *,
                deadline: Deadline = NO_DEADLINE) -> list[tuple[str, object]]:
    """(name to report, file to read: a path or a zip's Member) of every file of a study folder or zip; a
    zip is read in place (zip_members), its members that are no DICOM by their first bytes go to `skipped`
    instead, with their reason. work: unused (a zip used to be extracted there)."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        files, rejected = zip_members(path, deadline=deadline)
        if skipped is not None:
            skipped.extend(rejected)
        return files
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


def _normal(orientation) -> np.ndarray:
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    return normal / max(np.linalg.norm(normal), 1e-12)


def _is_axial(orientation) -> bool:
    return bool(spans_a_plane(orientation) and abs(_normal(orientation)[2]) >= AXIAL_MIN_COS)


def _split_planes(slices: list) -> tuple[list, list]:
    """A series' slices -> (those in its main plane, those in another): one odd slice (a sagittal
    orientation in an axial series) must not make the whole series unusable."""
    normals = np.array([_normal(h.orientation) for _, _, h in slices])
    signed = normals * np.where(normals[np.arange(len(normals)), np.abs(normals).argmax(1)] < 0, -1, 1)[:, None]
    keys = [tuple(k) for k in np.round(signed, 1)]
    main = signed[keys.index(Counter(keys).most_common(1)[0][0])]
    keep = np.abs(normals @ main) >= SAME_PLANE_COS
    return [s for s, k in zip(slices, keep) if k], [s for s, k in zip(slices, keep) if not k]


MIN_SLICES = 3  # one or two slices are no series: stage two reads each slice's neighbors along z


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


@dataclass
class StudyHeaders:
    """Every file's header, read once (`read_headers`): the slices of each CT series in its main plane,
    those in another plane, the files set aside with reasons, and the series list (`choose_series`'s order)."""
    by_series: dict
    off_plane: dict
    skipped: list
    series: list


def read_headers(files: list[tuple[str, Path]], *, max_pixels: int = MAX_PIXELS, skipped: list | None = None,
                 deadline: Deadline = NO_DEADLINE) -> StudyHeaders:
    """Read every header (ich.dicom.read_header's caps); group the CT slices by series and order the series:
    axial first, then by slice count (most first), then by UID."""
    by_series, skipped, off_plane = {}, list(skipped or []), {}
    for name, path in files:
        deadline.check()
        try:
            header = read_header(readable(path, max_file_bytes(max_pixels)), max_pixels=max_pixels)
        except Rejected as exc:
            skipped.append({"file": name, "reason": exc.reason, "detail": exc.detail})
            continue
        by_series.setdefault(header.series_id, []).append((name, path, header))
    for s in list(by_series):
        by_series[s], off_plane[s] = _split_planes(by_series[s])
    series = [{"series_id": s, "n_files": len(v), "axial": _is_axial(v[0][2].orientation)}
              for s, v in by_series.items()]
    series.sort(key=lambda s: (not s["axial"], -s["n_files"], s["series_id"]))
    for i, s in enumerate(series):
        s["index"] = i
    return StudyHeaders(by_series, off_plane, skipped, series)


def series_pixels(headers: StudyHeaders, index: int) -> int:
    """Rows x Columns summed over one series' slices, as their headers declare them."""
    return sum(h.rows * h.cols for _, _, h in headers.by_series[headers.series[index]["series_id"]])


def choose_series(files: list[tuple[str, Path]], *, max_pixels: int = MAX_PIXELS,
                  series_index: int | None = None, skipped: list | None = None,
                  deadline: Deadline = NO_DEADLINE) -> StudyFiles:
    """Read every header; keep one CT series, give every other file a reason.

    The series list is ordered axial first, then by slice count (most
    first), then by UID, so `series_index` (0 = the automatic choice when an
    axial series exists) names the same series on a second upload of the same
    files without a UID travelling through a URL. By default the axial series
    with the most slices is kept; a user may pick another CT series by its
    index (a non-axial one is out of what the networks saw, and
    `StudyFiles.series[i]["axial"]` says so). A series is judged by the plane
    most of its slices share; a slice of the chosen series in another plane
    is skipped as `other_plane` (one with no plane at all is `missing_position`,
    as in prepare_data). skipped: files already set aside (a zip's non-DICOM
    members), listed first.
    """
    headers = read_headers(files, max_pixels=max_pixels, skipped=skipped, deadline=deadline)
    return pick_series(headers, series_index)


def pick_series(headers: StudyHeaders, series_index: int | None = None) -> StudyFiles:
    """One series of headers read once (choose_series's rule, or series_index) as StudyFiles."""
    by_series, off_plane, series = headers.by_series, headers.off_plane, headers.series
    skipped = list(headers.skipped)
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
            for s in by_series for n, _, _ in by_series[s] + off_plane[s]], series)
    for s, v in by_series.items():
        if s != best:
            why = "another series was chosen" if series_index is not None else (
                "another axial series has more slices" if _is_axial(v[0][2].orientation) else "not axial")
            skipped += [{"file": n, "reason": OTHER_SERIES, "detail": why} for n, _, _ in v + off_plane[s]]
    skipped += [{"file": n, "reason": OTHER_PLANE, "detail": "its plane differs from the rest of its series"}
                for n, _, _ in off_plane[best]]
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
