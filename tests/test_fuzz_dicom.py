"""Every file comes out accepted or rejected with a reason, never as a crash.

Two sources of odd files:
- a property-based fuzz (hypothesis) that mutates generated slices: tags
  removed, wrong VRs, wrong lengths, odd values and transfer syntaxes,
  pixel data of the wrong size, random bytes, truncation at any offset. CI
  runs a fixed set of 40 examples; a longer, random run:
      ICH_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_fuzz_dicom.py
- pydicom's own test files (shipped inside the installed package): every
  one must end in slices.parquet or rejected.csv, and exactly the CT images
  (what pydicom itself reads as a CT slice, see `is_ct_image`) are accepted.
"""
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import uid

from conftest import phantom
from ich.config import PrepareConfig
from ich.dicom import REASONS, Rejected
from ich.prepare import prepare_split, read_one
from synthetic.dicom_writer import write_ct_slice

CFG = PrepareConfig(image_size=32, n_folds=2, n_jobs=2, chunk_size=16)
EXAMPLES = int(os.environ.get("ICH_FUZZ_EXAMPLES", "40"))

# --- a minimal explicit-VR little-endian element walker (what write_ct_slice writes) ---------

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ALL_VRS = sorted(LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                             b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US", b"ZZ", b"\0\0"})


def split_elements(data: bytes) -> list[list]:
    """data after the 132-byte preamble + 'DICM' -> [[tag, vr, value], ...]."""
    out, pos = [], 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in LONG_VRS:
            (length,), head = struct.unpack_from("<I", data, pos + 8), 12
        else:
            (length,), head = struct.unpack_from("<H", data, pos + 6), 8
        if length == 0xFFFFFFFF:  # encapsulated pixel data: runs to the end
            length = len(data) - pos - head
        out.append([(group << 16) | elem, vr, data[pos + head:pos + head + length], length])
        pos += head + length
    return out


def join_elements(data: bytes, elements) -> bytes:
    parts = [data[:132]]
    for tag, vr, value, length in elements:
        if vr in LONG_VRS:
            parts.append(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length & 0xFFFFFFFF))
        else:
            parts.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length & 0xFFFF))
        parts.append(value)
    return b"".join(parts)


# --- mutations ---------------------------------------------------------------------------------

SYNTAXES = [uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian,
            uid.JPEGBaseline8Bit, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless, "1.2.3.4", ""]
TEXT = st.sampled_from(["", "0", "1", "-1", "2", "1e9", "nan", "inf", "-0", "abc", "1\\2\\3", "65535", "\\",
                        " ", "CT", "MR", "ID_x", "../x", "1.5\\2.5", "-1024", "1e308"])
US = st.integers(0, 65535).map(lambda n: struct.pack("<H", n))
VALUE = st.one_of(TEXT.map(str.encode), US, st.binary(max_size=24),
                  st.sampled_from(SYNTAXES).map(lambda s: str(s).encode()))


def _pad(b: bytes) -> bytes:
    return b + b"\0" if len(b) % 2 else b


OPS = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 10_000)),
    st.tuples(st.just("vr"), st.integers(0, 10_000), st.sampled_from(ALL_VRS)),
    st.tuples(st.just("length"), st.integers(0, 10_000),
              st.one_of(st.sampled_from([0, 1, 3, 0xFFFF, 0xFFFFFFFF]), st.integers(0, 1 << 20))),
    st.tuples(st.just("value"), st.integers(0, 10_000), VALUE),
    st.tuples(st.just("pixels"), st.sampled_from([0, 1, 2, 100, -2, 2, 1 << 12])),
    st.tuples(st.just("frames"), TEXT),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
)


def mutate(data: bytes, ops, cut: float | None) -> bytes:
    els = split_elements(data)
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "pixels":  # PixelData of the wrong size (native), or garbage (encapsulated)
            px = next((e for e in els if e[0] == 0x7FE00010), None)
            if px is not None:
                n = args[0]
                px[2] = px[2][:len(px[2]) - 2] if n == -2 else (px[2] * 2 if n == 2 else bytes(n))
                px[3] = len(px[2])
        elif kind == "frames":  # a NumberOfFrames element, inserted in tag order
            els = [e for e in els if e[0] != 0x00280008]
            value = _pad(args[0].encode())
            els.append([0x00280008, b"IS", value, len(value)])
            els.sort(key=lambda e: (e[0] >> 16 != 2, e[0]))  # the meta group stays first
        elif kind == "flip":
            continue  # applied to the bytes below
        elif els:
            e = els[args[0] % len(els)]
            if kind == "delete":
                els.remove(e)
            elif kind == "vr":
                e[1] = args[1]  # the header layout now disagrees with the data: on purpose
            elif kind == "length":
                e[3] = args[1]
            elif kind == "value":
                e[2] = _pad(args[1])
                e[3] = len(e[2])
    out = bytearray(join_elements(data, els))
    for op in ops:
        if op[0] == "flip" and out:
            out[op[1] % len(out)] = op[2]
    if cut is not None:
        out = out[:int(len(out) * cut)]
    return bytes(out)


BASES = {}


def base(kind: str, folder: Path) -> bytes:
    """A generated slice, once per kind: plain, RLE-compressed, the 12-bit quirk, window lists."""
    if kind not in BASES:
        path = folder / f"base_{kind}.dcm"
        kw = {"rle": {"transfer_syntax": uid.RLELossless}, "bits12": {"bits12_quirk": True},
              "windows": {"window_center": [36, 40], "window_width": [80, 90]}}.get(kind, {})
        write_ct_slice(path, phantom(32, lesion=True), sop_uid="ID_fuzz", patient_id="ID_p", study_uid="ID_st",
                       series_uid="ID_se", **kw)
        BASES[kind] = path.read_bytes()
    return BASES[kind]


def outcome(path: Path) -> str:
    """'accepted' or the rejection reason; anything else raised is a crash: the test fails."""
    try:
        image, fields = read_one(path, CFG)
    except Rejected as rej:
        assert rej.reason in REASONS, rej.reason
        return rej.reason
    assert image.shape == (CFG.image_size, CFG.image_size, len(CFG.windows)) and image.dtype == np.uint8
    assert fields["sop_uid"] and np.isfinite(fields["z"])
    return "accepted"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="ICH_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["plain", "rle", "bits12", "windows"]), ops=st.lists(OPS, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_slices_are_accepted_or_rejected_never_a_crash(fuzz_dir, kind, ops, cut):
    path = fuzz_dir / "case.dcm"
    path.write_bytes(mutate(base(kind, fuzz_dir), ops, cut))
    outcome(path)


def test_the_mutations_reach_many_outcomes(fuzz_dir):
    """The fuzz is only worth something if its mutations produce varied files: check a few by hand."""
    plain = base("plain", fuzz_dir)
    tags = [e[0] for e in split_elements(plain)]
    cases = {
        "accepted": ([], None),
        "truncated": ([], 0.3),
        "missing_position": ([("delete", tags.index(0x00200032))], None),
        "bad_shape": ([("value", tags.index(t), struct.pack("<H", 65535)) for t in (0x00280010, 0x00280011)], None),
        "pixel_decode_failed": ([("pixels", 100)], None),
        "not_ct": ([("value", tags.index(0x00080060), b"MR")], None),
    }
    for want, (ops, cut) in cases.items():
        path = fuzz_dir / f"{want}.dcm"
        path.write_bytes(mutate(plain, ops, cut))
        assert outcome(path) == want


# --- pydicom's test corpus -------------------------------------------------------------------

CORPUS = Path(pydicom.data.__file__).parent / "test_files"
NEEDED = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
          "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept")


def is_ct_image(path: Path) -> bool:
    """What the corpus check calls a CT file, decided by pydicom alone (not ich.dicom): Modality
    CT, the header fields a slice table needs, and pixel data that decodes to one 2-D image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        if str(ds.get("Modality", "")).upper() != "CT" or any(ds.get(k) in (None, "") for k in NEEDED):
            return False
        if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: as read (see ich.dicom)
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                              uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
        pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - anything pydicom cannot read is no CT file
        return False
    return pixels.ndim == 2 and min(pixels.shape) >= 8


def test_pydicom_corpus_every_file_accounted_for_and_only_ct_images_accepted(tmp_path):
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file())
    assert len(files) > 100, f"pydicom's test files not found under {CORPUS}"
    split = tmp_path / "raw" / "stage_2_test"
    split.mkdir(parents=True)
    names = {}
    for path in files:  # flattened into one folder, like a Kaggle split
        name = str(path.relative_to(CORPUS)).replace(os.sep, "__")
        shutil.copy(path, split / name)
        names[name] = path
    prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)

    slices = pd.read_parquet(tmp_path / "clean" / "slices.parquet")
    rejected = pd.read_csv(tmp_path / "clean" / "rejected.csv", keep_default_na=False)
    accepted = set(slices["file"])
    assert accepted.isdisjoint(rejected["file"])
    assert accepted | set(rejected["file"]) == set(names)  # every file, exactly once
    assert rejected["reason"].isin(REASONS).all()
    assert (rejected["detail"].str.len() > 0).sum() >= len(rejected) - rejected["reason"].isin(
        ["duplicate_id", "no_labels"]).sum()
    assert accepted == {n for n, p in names.items() if is_ct_image(p)}
    reason = rejected.set_index("file")["reason"]
    assert {"CT_small.dcm", "693_J2KI.dcm"} <= accepted
    assert reason["MR_small.dcm"] == "not_ct"
    assert reason["dicomdirtests__DICOMDIR"] == "no_pixel_data"
    assert reason["README.txt"] == "not_dicom"
    assert reason["rtplan_truncated.dcm"] == "truncated"
