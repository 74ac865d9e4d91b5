"""Reading one CT slice: header fields, Hounsfield units, and the real data's quirks.

Everything that can go wrong with a file is turned into a `Rejected` exception
carrying a short machine-readable reason; prepare_data records it in
rejected.csv instead of stopping.

Quirks handled (all seen in the competition data):
- `ID_...` strings in UID fields: pydicom warns on every read; validation is
  switched off for reading so the logs stay readable.
- Outside-scanner padding stored as -2000: clipped to air (-1024 HU).
- WindowCenter/WindowWidth as a single value or a list: the first is kept.
- BitsStored 12, PixelRepresentation 0 and a RescaleIntercept above -100:
  the stored values are HU modulo 4096; shift by 1000, wrap at 4096 and use
  intercept -1000 (the recipe from the competition's discussion forum).
- Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through
  pydicom's pylibjpeg / gdcm plugins, which requirements.txt installs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

HU_MIN, HU_MAX = -1024.0, 3071.0
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Reasons a file is rejected (the first word of rejected.csv's `reason`).
REASONS = (
    "not_dicom",        # no DICOM structure at all
    "unreadable",       # DICOM whose header cannot be parsed (truncated, damaged)
    "not_ct",           # Modality is not CT
    "missing_uid",      # no SOPInstanceUID / PatientID / StudyInstanceUID / SeriesInstanceUID
    "unsafe_id",        # an ID that is not a safe file name (it becomes one downstream)
    "duplicate_id",     # a second file with an already seen SOPInstanceUID
    "missing_position", # ImagePositionPatient / ImageOrientationPatient absent or malformed
    "missing_rescale",  # RescaleSlope / RescaleIntercept absent or malformed
    "no_pixel_data",    # no PixelData element
    "pixel_decode_failed",  # PixelData present but cannot be decoded (truncated, corrupt)
    "bad_shape",        # decoded pixels are not one 2-D grayscale image
    "no_labels",        # train image absent from the label csv
)


class Rejected(Exception):
    """A file that cannot be used; `reason` is one of REASONS, `detail` free text."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SliceHeader:
    image_id: str
    patient_id: str
    study_id: str
    series_id: str
    position: tuple  # ImagePositionPatient (x, y, z) in mm
    orientation: tuple  # ImageOrientationPatient (6 direction cosines)
    rows: int
    cols: int
    pixel_spacing: float  # row spacing, mm (NaN when absent)
    slope: float
    intercept: float
    bits_stored: int
    pixel_representation: int
    window_center: float
    window_width: float

    @property
    def needs_bits12_fix(self) -> bool:
        return self.bits_stored == 12 and self.pixel_representation == 0 and self.intercept > -100

    @property
    def z(self) -> float:
        """Position projected on the slice normal: the order key within a series.

        Sorting by the raw z coordinate is wrong for tilted gantries; the
        projection on row x column direction is what the scanner stepped along.
        """
        o = np.asarray(self.orientation, dtype=np.float64)
        normal = np.cross(o[:3], o[3:])
        return float(np.dot(normal, np.asarray(self.position, dtype=np.float64)))


def _first(value) -> float:
    if value is None or value == "":
        return float("nan")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _floats(ds, keyword: str, n: int) -> tuple | None:
    value = ds.get(keyword)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not np.all(np.isfinite(out)):
        return None
    return out


def _open(path, stop_before_pixels: bool):
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble: some valid files lack it; retry leniently below
    except Exception as exc:  # noqa: BLE001 - any parse failure is a reason, not a crash
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:  # noqa: BLE001
        raise Rejected("not_dicom", f"{type(exc).__name__}: {exc}") from exc
    if "SOPInstanceUID" not in ds and "Modality" not in ds:
        raise Rejected("not_dicom", "no DICOM header found")
    return ds


def header_from_dataset(ds) -> SliceHeader:
    """Validate the tags prepare_data needs; raise Rejected naming the first problem."""
    if "SOPInstanceUID" not in ds and "Modality" not in ds:
        raise Rejected("unreadable", "header incomplete: no SOPInstanceUID and no Modality (truncated file?)")
    try:
        modality = str(ds.get("Modality", "")).strip().upper()
        if modality != "CT":
            raise Rejected("not_ct", f"Modality is {modality or 'absent'}")
        ids = {}
        for key in ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(key, "") or "").strip()
            if not value:
                raise Rejected("missing_uid", f"{key} absent")
            ids[key] = value
        for key in ("SOPInstanceUID", "SeriesInstanceUID"):
            if not SAFE_ID.match(ids[key]) or ids[key] in (".", ".."):
                raise Rejected("unsafe_id", f"{key} {ids[key]!r} is not a safe file name")
        position = _floats(ds, "ImagePositionPatient", 3)
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        if position is None or orientation is None:
            raise Rejected("missing_position", "ImagePositionPatient/ImageOrientationPatient absent or malformed")
        slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
        if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
            raise Rejected("missing_rescale", "RescaleSlope/RescaleIntercept absent or malformed")
        spacing = ds.get("PixelSpacing")
        return SliceHeader(
            image_id=ids["SOPInstanceUID"],
            patient_id=ids["PatientID"],
            study_id=ids["StudyInstanceUID"],
            series_id=ids["SeriesInstanceUID"],
            position=position,
            orientation=orientation,
            rows=int(ds.get("Rows", 0) or 0),
            cols=int(ds.get("Columns", 0) or 0),
            pixel_spacing=_first(spacing),
            slope=slope,
            intercept=intercept,
            bits_stored=int(ds.get("BitsStored", 16) or 16),
            pixel_representation=int(ds.get("PixelRepresentation", 1) or 0),
            window_center=_first(ds.get("WindowCenter")),
            window_width=_first(ds.get("WindowWidth")),
        )
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed values of any kind
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc


def read_header(path) -> SliceHeader:
    """Header only (pixel data not read): the cheap first pass over all files."""
    return header_from_dataset(_open(path, stop_before_pixels=True))


def to_hu(stored: np.ndarray, header: SliceHeader) -> np.ndarray:
    """Stored values -> float32 HU in [HU_MIN, HU_MAX], with the 12-bit fix."""
    slope, intercept = header.slope, header.intercept
    if header.needs_bits12_fix:
        x = stored.astype(np.int32) + 1000
        x[x >= 4096] -= 4096
        stored, intercept = x, -1000.0
    hu = stored.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)  # -2000 padding and detector garbage -> air / max
    return hu


def read_stored(path) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the stored pixel values (2-D), no conversion yet."""
    ds = _open(path, stop_before_pixels=False)
    header = header_from_dataset(ds)
    if "PixelData" not in ds:
        raise Rejected("no_pixel_data", "no PixelData element")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / unsupported codec
        raise Rejected("pixel_decode_failed", f"{type(exc).__name__}: {exc}") from exc
    if stored.ndim != 2 or min(stored.shape) < 8:
        raise Rejected("bad_shape", f"pixel array shape {stored.shape}")
    return header, stored


def read_hu(path) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the slice in HU (float32, 2-D)."""
    header, stored = read_stored(path)
    return header, to_hu(stored, header)
