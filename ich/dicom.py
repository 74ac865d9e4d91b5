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
        self.header: SliceHeader | None = None  # set when the header was valid (pixel problems)


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
        r0, r1, r2, c0, c1, c2 = self.orientation
        x, y, z = self.position
        return (r1 * c2 - r2 * c1) * x + (r2 * c0 - r0 * c2) * y + (r0 * c1 - r1 * c0) * z


# The tags prepare needs, read straight from the raw element bytes when the file is
# little endian (all CT files in practice): pydicom's per-element conversion costs
# about as much as decoding the pixels, and these are plain ASCII numbers and IDs.
_TAGS = {
    "Modality": 0x00080060, "SOPInstanceUID": 0x00080018, "PatientID": 0x00100020,
    "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E,
    "ImagePositionPatient": 0x00200032, "ImageOrientationPatient": 0x00200037,
    "Rows": 0x00280010, "Columns": 0x00280011, "PixelSpacing": 0x00280030,
    "BitsStored": 0x00280101, "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050, "WindowWidth": 0x00281051,
    "RescaleIntercept": 0x00281052, "RescaleSlope": 0x00281053,
    "BitsAllocated": 0x00280100, "SamplesPerPixel": 0x00280002, "NumberOfFrames": 0x00280008,
}
_BINARY = {"Rows", "Columns", "BitsStored", "PixelRepresentation", "BitsAllocated", "SamplesPerPixel"}
_NATIVE = {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}


def _tag_values(ds) -> dict:
    """keyword -> list of str (text tags) or int (US tags); absent or empty tags are left out."""
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    out = {}
    for keyword, tag in _TAGS.items():
        try:
            el = ds.get_item(tag)
        except (KeyError, ValueError):
            el = None
        if el is None:
            continue
        raw = getattr(el, "value", None)
        if isinstance(el, pydicom.dataelem.RawDataElement) and little and isinstance(raw, bytes):
            if keyword in _BINARY:
                if len(raw) >= 2:
                    out[keyword] = int.from_bytes(raw[:2], "little")
                continue
            text = raw.decode("latin-1").strip(" \x00")
            if text:
                out[keyword] = [v.strip(" \x00") for v in text.split("\\")]
            continue
        value = ds[tag].value  # converted by pydicom (big endian, or already converted)
        if value is None or value == "":
            continue
        if keyword in _BINARY:
            out[keyword] = int(value)
        elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            out[keyword] = [str(v).strip() for v in value]
        else:
            out[keyword] = [str(value).strip()]
    return out


def _first(values) -> float:
    try:
        return float(values[0]) if values else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _floats(values, n: int) -> tuple | None:
    try:
        out = tuple(float(v) for v in values or ())
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


def header_from_dataset(ds, v: dict | None = None) -> SliceHeader:
    """Validate the tags prepare_data needs; raise Rejected naming the first problem."""
    try:
        v = _tag_values(ds) if v is None else v
    except Exception as exc:  # noqa: BLE001 - malformed values of any kind
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if "SOPInstanceUID" not in v and "Modality" not in v:
        raise Rejected("unreadable", "header incomplete: no SOPInstanceUID and no Modality (truncated file?)")
    modality = v.get("Modality", [""])[0].upper()
    if modality != "CT":
        raise Rejected("not_ct", f"Modality is {modality or 'absent'}")
    ids = {}
    for key in ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = "\\".join(v.get(key, [])).strip()
        if not value:
            raise Rejected("missing_uid", f"{key} absent")
        ids[key] = value
    for key in ("SOPInstanceUID", "SeriesInstanceUID"):
        if not SAFE_ID.match(ids[key]) or ids[key] in (".", ".."):
            raise Rejected("unsafe_id", f"{key} {ids[key]!r} is not a safe file name")
    position = _floats(v.get("ImagePositionPatient"), 3)
    orientation = _floats(v.get("ImageOrientationPatient"), 6)
    if position is None or orientation is None:
        raise Rejected("missing_position", "ImagePositionPatient/ImageOrientationPatient absent or malformed")
    slope, intercept = _first(v.get("RescaleSlope")), _first(v.get("RescaleIntercept"))
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise Rejected("missing_rescale", "RescaleSlope/RescaleIntercept absent or malformed")
    return SliceHeader(
        image_id=ids["SOPInstanceUID"],
        patient_id=ids["PatientID"],
        study_id=ids["StudyInstanceUID"],
        series_id=ids["SeriesInstanceUID"],
        position=position,
        orientation=orientation,
        rows=v.get("Rows", 0),
        cols=v.get("Columns", 0),
        pixel_spacing=_first(v.get("PixelSpacing")),
        slope=slope,
        intercept=intercept,
        bits_stored=v.get("BitsStored", 16),
        pixel_representation=v.get("PixelRepresentation", 1),
        window_center=_first(v.get("WindowCenter")),
        window_width=_first(v.get("WindowWidth")),
    )


def read_header(path) -> SliceHeader:
    """Header only (pixel data not read): the cheap first pass over all files."""
    return header_from_dataset(_open(path, stop_before_pixels=True))


def fix_bits12(stored: np.ndarray) -> np.ndarray:
    """The broken 12-bit files store HU mod 4096: shift by 1000 and wrap (use intercept -1000)."""
    x = stored.astype(np.int16) + np.int16(1000)  # 12-bit values + 1000 fit in int16
    x[x >= 4096] -= 4096
    return x


def to_hu(stored: np.ndarray, header: SliceHeader) -> np.ndarray:
    """Stored values -> float32 HU in [HU_MIN, HU_MAX], with the 12-bit fix."""
    slope, intercept = header.slope, header.intercept
    if header.needs_bits12_fix:
        stored, intercept = fix_bits12(stored), -1000.0
    hu = stored.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)  # -2000 padding and detector garbage -> air / max
    return hu


def read_stored(path) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the stored pixel values (2-D), no conversion yet."""
    ds = _open(path, stop_before_pixels=False)
    try:
        values = _tag_values(ds)
    except Exception as exc:  # noqa: BLE001 - malformed values of any kind
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    header = header_from_dataset(ds, values)
    try:
        if "PixelData" not in ds:
            raise Rejected("no_pixel_data", "no PixelData element")
        stored = _native_pixels(ds, header, values)
        if stored is None:
            try:
                stored = ds.pixel_array
            except Exception as exc:  # noqa: BLE001 - truncated / corrupt / unsupported codec
                raise Rejected("pixel_decode_failed", f"{type(exc).__name__}: {exc}") from exc
        if stored.ndim != 2 or min(stored.shape) < 8:
            raise Rejected("bad_shape", f"pixel array shape {stored.shape}")
    except Rejected as rej:
        rej.header = header  # the image is known: predict can still place it in its series
        raise
    return header, stored


def _native_pixels(ds, header: SliceHeader, v: dict) -> np.ndarray | None:
    """The common case without pydicom's pixel machinery: uncompressed little-endian
    16-bit single-frame grayscale is just a buffer view (what pydicom returns too,
    at a fraction of its bookkeeping cost). Anything else (compressed, other bit
    depths, sign extension of <16-bit signed, a wrong length): None, so pydicom
    decodes it and reports its errors."""
    try:
        if ds.file_meta.TransferSyntaxUID not in _NATIVE:
            return None
    except AttributeError:
        return None
    frames = v.get("NumberOfFrames", ["1"])[0]
    if (v.get("BitsAllocated") != 16 or v.get("SamplesPerPixel", 1) != 1 or frames not in ("1", "")
            or (header.bits_stored != 16 and header.pixel_representation != 0)):
        return None
    data = ds.get_item(0x7FE00010).value
    if not isinstance(data, bytes) or len(data) != header.rows * header.cols * 2:
        return None
    dtype = "<i2" if header.pixel_representation == 1 else "<u2"
    return np.frombuffer(data, dtype=dtype).reshape(header.rows, header.cols)


def read_hu(path) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the slice in HU (float32, 2-D)."""
    header, stored = read_stored(path)
    return header, to_hu(stored, header)
