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

Hostile or broken input (README "What happens to bad input"): a file is
stat'ed before it is opened (links to nothing, devices and FIFOs are
`not_a_file`; a file larger than any slice within `max_pixels` is `too_large`),
and the declared shape is checked before any decoder allocates it, so one
file can cost a worker at most a few times 8 x max_pixels bytes. A data set
without preamble and file meta is read anyway; a file cut short says
`truncated`, however far it got.
"""
from __future__ import annotations

import io
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.encaps
from pydicom.errors import InvalidDicomError

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

HU_MIN, HU_MAX = -1024.0, 3071.0
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Reasons a file is rejected (the first word of rejected.csv's `reason`).
REASONS = (
    "not_a_file",       # a dangling symlink, a device, a FIFO or a socket: nothing to read
    "too_large",        # bigger than a slice within max_pixels can be, or a header of myriad elements
    "not_dicom",        # no DICOM structure at all
    "unreadable",       # DICOM whose header cannot be parsed (damaged)
    "truncated",        # the file ends before its declared end (inside the header or the pixel data)
    "not_ct",           # Modality is not CT (or absent on a file that holds pixels)
    "missing_uid",      # no SOPInstanceUID / PatientID / StudyInstanceUID / SeriesInstanceUID
    "unsafe_id",        # an ID that is not a safe file name (it becomes one downstream)
    "duplicate_id",     # a second file with an already seen image_id
    "missing_position", # ImagePositionPatient / ImageOrientationPatient absent or malformed
    "missing_rescale",  # RescaleSlope / RescaleIntercept absent or malformed
    "no_pixel_data",    # no PixelData: a DICOM object that is no image (DICOMDIR, report), or a CT without pixels
    "pixel_decode_failed",  # whole PixelData that cannot be decoded (corrupt stream, fewer bytes than the shape)
    "bad_shape",        # not one 2-D grayscale image within max_pixels: checked on the header, before decoding
    "unsupported_syntax",  # Deflated Explicit VR Little Endian: inflating is not bounded by the file's size
    "no_labels",        # train image absent from the label csv
)

# Caps checked before anything is decoded, so a hostile header cannot make a worker
# allocate what it declares (65535 x 65535 x 2 bytes is 8.5 GB). PrepareConfig.max_pixels
# overrides MAX_PIXELS; a file may hold up to 8 bytes a pixel plus HEADER_SLACK bytes.
MAX_PIXELS = 4096 * 4096
HEADER_SLACK = 4 << 20


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold one slice within max_pixels (64-bit pixels, 4 MiB of header)."""
    return 8 * max_pixels + HEADER_SLACK


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


def _check_file(path, max_pixels: int) -> int:
    """Refuse what is no regular file, or too big to be one slice, before opening it.

    Opening a FIFO blocks for ever and /dev/zero never ends; a dangling link has
    nothing to read; and pydicom reads a whole file into memory, so the file's
    size is the first bound on a worker's memory. `path` may also be the
    file's bytes (the in-memory engine's input): only the size cap applies.
    """
    if isinstance(path, (bytes, bytearray)):
        size = len(path)
        if size > max_file_bytes(max_pixels):
            raise Rejected("too_large", f"{size:,} bytes, more than a slice of at most {max_pixels:,} pixels "
                                        f"takes ({max_file_bytes(max_pixels):,})")
        return size
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            raise Rejected("not_a_file", f"symlink to {os.readlink(path)} that leads nowhere") from None
        if isinstance(exc, FileNotFoundError):
            raise Rejected("not_a_file", "the file vanished before it was read") from None
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(st.st_mode)), "no regular file")
        raise Rejected("not_a_file", f"{kind}, not a regular file")
    if st.st_size > max_file_bytes(max_pixels):
        raise Rejected("too_large", f"{st.st_size:,} bytes, more than a slice of at most {max_pixels:,} pixels "
                                    f"takes ({max_file_bytes(max_pixels):,})")
    return st.st_size


MAX_READS = 200_000  # pydicom's read() calls on one file; it makes 2 to 3 an element


class _BoundedFile(io.BufferedReader):
    """A file that stops pydicom after MAX_READS read() calls.

    pydicom keeps every header element as a Python object of about 300
    bytes, and 8 bytes of file make an element: 8 MB of empty elements took
    310 MB and 7 s, so a file within the size cap could still take GBs. A CT
    header has tens to hundreds of elements (nested ones included), never
    tens of thousands.
    """

    def __init__(self, path):
        if isinstance(path, (bytes, bytearray)):
            raw = io.BytesIO(path)
            raw.name = "<bytes>"  # pydicom asks the file for its name
        else:
            raw = io.FileIO(path, "rb")
        super().__init__(raw)
        self._left = MAX_READS

    def read(self, size=-1, /):
        self._left -= 1
        if self._left < 0:
            raise Rejected("too_large", f"more than {MAX_READS:,} header reads: tens of thousands of elements")
        return super().read(size)


SNIFF_BYTES = 4096  # the preamble, DICM and a file meta group fit in this, in any file seen so far
DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_FIRST_GROUPS = {0x0002, 0x0004, 0x0008}  # a data set's first group: file meta, DICOMDIR or identification


def _group(b: bytes, little: bool = True) -> int:
    return int.from_bytes(b[:2], "little" if little else "big")


def _meta_syntax(head: bytes) -> tuple[str | None, int | None]:
    """(TransferSyntaxUID, offset of the data set) from the file meta after 'DICM' in head; None where
    head ends first or the meta is odd (pydicom then reads the file and says what is wrong)."""
    pos, syntax = 132, None
    for _ in range(64):
        if pos + 8 > len(head):
            return syntax, None
        tag_group, element = _group(head[pos:]), int.from_bytes(head[pos + 2:pos + 4], "little")
        if tag_group != 0x0002:
            return syntax, pos
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return syntax, None
            length, start = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        if start + length > len(head):
            return syntax, None
        if element == 0x0010:
            syntax = head[start:start + length].decode("latin-1").strip(" \x00")
        pos = start + length
    return syntax, None


def sniff(head: bytes) -> None:
    """Refuse from a file's first bytes (up to SNIFF_BYTES) what needs no parse; silent when in doubt.

    - No 'DICM' at byte 128 and a first tag outside the groups a data set starts
      with (0002, 0004, 0008): `not_dicom`, without a forced parse. pydicom's
      force=True reads anything, 1 MiB of zeros as 131,072 empty elements (0.6 s).
    - The Deflated Explicit VR transfer syntax: `unsupported_syntax`. pydicom
      inflates the whole data set in memory, so a 1.5 MB file can hold a 1.5 GiB
      element; no CT scanner writes it.
    - A file meta followed by zeros: `unreadable`, for the same reason as the first.
    A head that ends before a decision (a file cut short) is left to pydicom, which says `truncated`.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        syntax, data_at = _meta_syntax(head)
        if syntax == DEFLATED:
            raise Rejected("unsupported_syntax", f"Deflated Explicit VR Little Endian ({DEFLATED}): its inflated "
                                                 "size is not bounded by the file's; not read")
        if data_at is not None and data_at + 4 <= len(head) and head[data_at:data_at + 4] == b"\0\0\0\0":
            raise Rejected("unreadable", "the data set after the file meta starts with zeros")
        return
    if len(head) >= 4 and _group(head) not in _FIRST_GROUPS and _group(head, little=False) not in _FIRST_GROUPS:
        if len(head) < 132 and not head.strip(b"\0"):
            return  # a file cut inside its preamble: pydicom says truncated (or not_dicom)
        raise Rejected("not_dicom", "neither a DICOM preamble nor a data set at the start of the file")


def _sniff_file(path) -> None:
    if isinstance(path, (bytes, bytearray)):
        sniff(bytes(path[:SNIFF_BYTES]))
        return
    with open(path, "rb") as f:
        sniff(f.read(SNIFF_BYTES))


def _dcmread(path, stop_before_pixels: bool, force: bool = False):
    with _BoundedFile(path) as fp:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=force)


def _open(path, stop_before_pixels: bool, size: int | None = None):
    try:
        _sniff_file(path)
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    try:
        ds = _dcmread(path, stop_before_pixels)
    except InvalidDicomError:
        ds = _open_bare(path, stop_before_pixels)  # no preamble / file meta: some writers omit them
    except (Rejected, MemoryError):  # out of memory says nothing of the file: the caller's limit
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a reason, not a crash
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    with _failing_as("unreadable"):  # pydicom parses values lazily: errors surface on first access
        fill_transfer_syntax(ds)
        _check_not_cut(ds, None if stop_before_pixels else size)
    return ds


def _open_bare(path, stop_before_pixels: bool):
    """A data set without the 128-byte preamble and file meta: pydicom reads it with force=True.

    force=True also "reads" any text file as a few garbage elements, so a file
    is taken for DICOM only when it names a SOPInstanceUID or a Modality.
    """
    try:
        ds = _dcmread(path, stop_before_pixels, force=True)
        found = "SOPInstanceUID" in ds or "Modality" in ds
    except (Rejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise Rejected("not_dicom", f"{type(exc).__name__}: {exc}") from exc
    if not found:
        raise Rejected("not_dicom", "no DICOM header found")
    return ds


def fill_transfer_syntax(ds) -> None:
    """Without a file meta (or a TransferSyntaxUID in it) pydicom parses the data set but
    refuses to decode its pixels; the encoding it detected while parsing is the answer."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                              pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)


@contextmanager
def _failing_as(reason: str):
    """Turn any exception inside into Rejected(reason): pydicom raises many kinds on damaged
    input (ValueError, NotImplementedError for an unknown VR, struct.error, ...), and the
    RLE decoder (Rust) panics with pyo3's PanicException, a BaseException. MemoryError is no
    reason of the file's: it goes up (the web app's reading process refuses the upload with its
    memory limit; prepare_data stops with one line, and resumes)."""
    try:
        yield
    except (Rejected, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust decoder's panic (pyo3) is no Exception
        raise Rejected(reason, f"{type(exc).__name__}: {exc}") from exc


PIXEL_DATA = 0x7FE00010


def _check_not_cut(ds, size: int | None) -> None:
    """pydicom keeps whatever it read from a file cut short, without a word; say `truncated`.

    A cut shows as an empty data set, as a last element holding fewer bytes
    than it declares, or (full reads, `size` given) as 1 to 7 bytes after the
    last element: the start of an element header that pydicom drops. A cut
    inside the pixel data is checked later (`_check_pixels_whole`), once the
    header is known, so that the image keeps its place in its series.
    """
    tags = list(ds.keys())
    if not tags:
        raise Rejected("truncated", "no data set after the file meta header")
    last = max(tags)
    if last == PIXEL_DATA:
        return
    el = ds.get_item(last)
    got = _short_by(el)
    if got is not None:
        raise Rejected("truncated", f"the file ends inside element {last}: {got[0]} of its {got[1]} bytes")
    deflated = getattr(ds, "file_meta", {}).get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    tell = getattr(el, "value_tell", None)
    if size is not None and not deflated and tell is not None and isinstance(el.value, bytes) \
            and 0 < size - (tell + len(el.value)) < 8:
        raise Rejected("truncated", f"the file ends inside the header of the element after {last}")


def _short_by(el) -> tuple[int, int] | None:
    """(bytes held, bytes declared) of a raw element cut short, else None."""
    if not isinstance(el, pydicom.dataelem.RawDataElement) or not isinstance(el.value, bytes):
        return None
    if el.length == 0xFFFFFFFF or len(el.value) >= el.length:
        return None  # undefined length (sequence, encapsulated pixels) is parsed, not counted
    return len(el.value), el.length


def _check_pixels_whole(ds) -> None:
    """A file cut inside its (native) pixel data: `truncated`, the header being fine."""
    got = _short_by(ds.get_item(PIXEL_DATA))
    if got is not None:
        raise Rejected("truncated", f"the file ends inside the pixel data: {got[0]:,} of its {got[1]:,} bytes")


def _explain_no_pixels(ds, v: dict) -> None:
    """A full read found no PixelData and none of the tags of an image: a DICOM object that is
    no image at all (DICOMDIR, report, private data), not a damaged file. Anything else goes
    on to the header checks (not_ct, missing_*) and ends as no_pixel_data."""
    if not any(k in v for k in ("SOPInstanceUID", "Modality", "Rows")):
        sop_class = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")
        name = getattr(sop_class, "name", "") or str(sop_class) or "no SOP class"
        raise Rejected("no_pixel_data", f"a DICOM object without an image ({name})")


def spans_a_plane(orientation) -> bool:
    """Row and column direction cosines that are not zero and at least 30 degrees apart."""
    o = np.asarray(orientation, dtype=float)
    r, c = o[:3], o[3:]
    rn, cn = np.linalg.norm(r), np.linalg.norm(c)
    return bool(rn > 1e-3 and cn > 1e-3 and np.linalg.norm(np.cross(r, c)) / (rn * cn) >= 0.5)


def header_from_dataset(ds, v: dict | None = None) -> SliceHeader:
    """Validate the tags prepare_data needs; raise Rejected naming the first problem."""
    try:
        v = _tag_values(ds) if v is None else v
    except Exception as exc:  # noqa: BLE001 - malformed values of any kind
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
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
    if not spans_a_plane(orientation):
        raise Rejected("missing_position", "ImageOrientationPatient spans no plane (zero or parallel direction "
                                           "cosines): the slice has no place along its series")
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


def read_header(path, max_pixels: int = MAX_PIXELS) -> SliceHeader:
    """Header only (pixel data not read): the cheap first pass over all files."""
    _check_file(path, max_pixels)
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


def read_stored(path, max_pixels: int = MAX_PIXELS) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the stored pixel values (2-D), no conversion yet.

    Memory is bounded before anything is allocated: the file's size (pydicom
    reads it whole) and the declared shape (the decoder allocates it) are
    checked against max_pixels first, and pydicom's reads are counted
    (`_BoundedFile`). The common file (uncompressed, little endian, 16-bit)
    gives its pixels as a view of the file's bytes (`_read_in_place`); every
    other file, and every rejection, goes through pydicom's full read.
    """
    size = _check_file(path, max_pixels)
    in_place = _read_in_place(path, size, max_pixels)
    if in_place is not None:
        return in_place
    return _read_stored_pydicom(path, size, max_pixels)


def _read_in_place(path, size: int, max_pixels: int) -> tuple[SliceHeader, np.ndarray] | None:
    """The common file read without copying its pixels: None where it is not that file, and the caller
    reads it with pydicom (`_read_stored_pydicom`), which gives the same image or names the reason.

    pydicom reads the pixel element into a fresh 512 KB buffer, a copy of
    the bytes the file (or the inflated zip member) already holds in memory,
    page faults included: its full read of a 512-px slice took 0.67 ms, this
    one 0.33 ms (benchmarks/zip_slice.py, BENCHMARKS.md). Here the header is parsed up to the pixel
    element (stop_before_pixels) and the pixels are a numpy view of the
    file's own bytes at the element's offset. Taken only when every check of
    the full read passes and the pixels need no decoder: uncompressed little
    endian (the file meta says so), 16-bit single-frame grayscale, the pixel
    element whole and last (or followed only by the trailing padding
    element), so nothing after it is left to parse or to find cut.
    Anything else (compressed, big endian, no file meta, odd bit depths, a
    rejected file) goes the full road; a rejected file is read twice, which
    costs only the rare bad file.
    """
    if isinstance(path, bytes):
        data = path
    elif isinstance(path, (str, os.PathLike)):
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)
        except OSError:
            return None
        if len(data) != size:
            return None  # changed since its stat: the full road says what it is now
    else:
        return None  # a bytearray may change under a view: the full road copies it
    try:
        sniff(data[:SNIFF_BYTES])
        with _BoundedFile(data) as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            at = fp.tell()
        syntax = ds.file_meta.get("TransferSyntaxUID")
        implicit, little = ds.original_encoding
        if syntax not in _NATIVE or not little or at + 8 > len(data) \
                or int.from_bytes(data[at:at + 4], "little") != 0x00107FE0:  # (7FE0,0010) PixelData
            return None
        if implicit:
            length, start = int.from_bytes(data[at + 4:at + 8], "little"), at + 8
        elif data[at + 4:at + 6] in (b"OW", b"OB") and at + 12 <= len(data):
            length, start = int.from_bytes(data[at + 8:at + 12], "little"), at + 12
        else:
            return None
        if start + length != len(data) and not _padding_only(data, start + length, implicit):
            return None  # encapsulated (undefined length), cut short, or elements after the pixels
        _check_not_cut(ds, None)
        values = _tag_values(ds)
        header = header_from_dataset(ds, values)
        _check_declared_shape(header, values, max_pixels)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException:  # noqa: BLE001 - anything odd: the full road reads it and names the reason
        return None
    frames = values.get("NumberOfFrames", ["1"])[0]
    if (values.get("BitsAllocated") != 16 or values.get("SamplesPerPixel", 1) != 1 or frames not in ("1", "")
            or (header.bits_stored != 16 and header.pixel_representation != 0)
            or length != header.rows * header.cols * 2):
        return None  # as _native_pixels: what pydicom's decoder must convert
    dtype = "<i2" if header.pixel_representation == 1 else "<u2"
    return header, np.frombuffer(data, dtype=dtype, count=header.rows * header.cols,
                                 offset=start).reshape(header.rows, header.cols)


def _padding_only(data: bytes, at: int, implicit: bool) -> bool:
    """Whether data[at:] is exactly one whole Data Set Trailing Padding element (FFFC,FFFC), which some
    writers put after the pixels (pydicom's CT_small.dcm): the full read parses it and finds nothing cut."""
    if int.from_bytes(data[at:at + 4], "little") != 0xFFFCFFFC:
        return False
    head = 8 if implicit else 12
    if at + head > len(data) or (not implicit and data[at + 4:at + 8] != b"OB\0\0"):
        return False
    return at + head + int.from_bytes(data[at + head - 4:at + head], "little") == len(data)


def _read_stored_pydicom(path, size: int, max_pixels: int) -> tuple[SliceHeader, np.ndarray]:
    """read_stored by pydicom's full read: every file that is not the common case, and every rejection."""
    ds = _open(path, stop_before_pixels=False, size=size)
    with _failing_as("unreadable"):
        values = _tag_values(ds)
        has_pixels = "PixelData" in ds
        if not has_pixels:
            _explain_no_pixels(ds, values)
    header = header_from_dataset(ds, values)
    try:
        if not has_pixels:
            raise Rejected("no_pixel_data", "no PixelData element (or the file was cut just before it)")
        _check_declared_shape(header, values, max_pixels)
        with _failing_as("pixel_decode_failed"):  # truncated / corrupt / unsupported codec or VR
            _check_pixels_whole(ds)
            stored = _native_pixels(ds, header, values)
            if stored is None:
                _check_codestream(ds, header)
                if ds.file_meta.get("TransferSyntaxUID") == pydicom.uid.RLELossless:
                    # pylibjpeg-rle (Rust) panics on some damaged streams, printing a Rust
                    # backtrace from the worker; pydicom's own decoder raises a plain error
                    # (4.5 instead of 1.4 ms a 512-px slice; no competition file is RLE)
                    ds.pixel_array_options(decoding_plugin="pydicom")
                stored = ds.pixel_array
        if stored.ndim != 2 or min(stored.shape) < 8:
            raise Rejected("bad_shape", f"pixel array shape {stored.shape}")
    except Rejected as rej:
        rej.header = header  # the image is known: predict can still place it in its series
        raise
    return header, stored


def _check_declared_shape(header: SliceHeader, v: dict, max_pixels: int) -> None:
    """Refuse, from the header alone, what cannot be one grayscale slice within max_pixels.

    The decoder allocates Rows x Columns x frames x samples x BitsAllocated/8
    bytes from the header's word, whatever the file holds: 5 kB of RLE
    declaring 65535 x 65535 pixels cost 8.5 GB and 53 s before this check.
    One file is one image_id, so a multi-frame file cannot be used anyway.
    """
    frames = v.get("NumberOfFrames", ["1"])[0] or "1"
    if frames.strip() not in ("1", "1.0"):
        raise Rejected("bad_shape", f"NumberOfFrames {frames[:20]}: a slice is one frame")
    if v.get("SamplesPerPixel", 1) != 1:
        raise Rejected("bad_shape", f"SamplesPerPixel {v['SamplesPerPixel']}: not grayscale")
    if v.get("BitsAllocated", 16) not in (8, 16, 32):
        raise Rejected("bad_shape", f"BitsAllocated {v['BitsAllocated']}")
    rows, cols = header.rows, header.cols
    if min(rows, cols) < 8:
        raise Rejected("bad_shape", f"Rows x Columns {rows} x {cols}")
    if rows * cols > max_pixels:
        raise Rejected("bad_shape", f"declares {rows} x {cols} pixels, more than max_pixels ({max_pixels:,})")


def codestream_shape(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG 2000 (SIZ) or JPEG / JPEG-LS (SOF) codestream declares in its
    first bytes; None when `data` is neither (RLE has no shape of its own) or ends first."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ, raw or inside a JP2 box
    if at >= 0 and len(data) >= at + 42:
        x, y, x0, y0 = (int.from_bytes(data[at + 8 + 4 * i:at + 12 + 4 * i], "big") for i in range(4))
        return y - y0, x - x0, int.from_bytes(data[at + 40:at + 42], "big")
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if pos + 10 > len(data):
                return None
            return (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big"),
                    data[pos + 9])
        pos += 2 + length
    return None


def _check_codestream(ds, header: SliceHeader) -> None:
    """A compressed slice must decode to the shape its header declares: the decoder allocates what the
    codestream says, and 790 bytes of JPEG 2000 can say 16384 x 16384 under a header of 512 x 512."""
    if not getattr(ds.get_item(PIXEL_DATA), "value", b"")[:4] == b"\xfe\xff\x00\xe0":
        return  # not encapsulated
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1), b"")
    shape = codestream_shape(bytes(frame[:4096]))
    if shape is not None and shape != (header.rows, header.cols, 1):
        raise Rejected("bad_shape", f"the compressed image is {shape[0]} x {shape[1]} ({shape[2]} component(s)); "
                                    f"its header declares {header.rows} x {header.cols}")


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


def read_hu(path, max_pixels: int = MAX_PIXELS) -> tuple[SliceHeader, np.ndarray]:
    """Full read: header plus the slice in HU (float32, 2-D)."""
    header, stored = read_stored(path, max_pixels)
    return header, to_hu(stored, header)
