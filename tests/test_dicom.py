"""Reading one slice: the real competition slice, each quirk, each rejection reason."""
import struct
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from conftest import phantom
from ich.dicom import REASONS, Rejected, read_header, read_hu
from synthetic.dicom_writer import write_ct_slice

IDS = dict(sop_uid="ID_0123abcde", patient_id="ID_p1", study_uid="ID_st1", series_uid="ID_se1")


def test_real_slice(real_slice):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ID_ UIDs must not spam warnings
        header, hu = read_hu(real_slice)
    assert header.image_id == "ID_0000ca2f6" and header.series_id == "ID_d6ba679446"
    assert header.patient_id == "ID_8c5a14af" and header.study_id == "ID_a84b7a0dcd"
    assert (header.window_center, header.window_width) == (30.0, 80.0)
    assert (header.intercept, header.slope, header.bits_stored) == (-1024.0, 1.0, 16)
    assert not header.needs_bits12_fix
    assert hu.shape == (512, 512) and hu.dtype == np.float32
    # -2000 padding clipped to air; skull is bright; brain tissue present
    assert hu.min() == -1024 and 1500 < hu.max() <= 3071
    assert 0.2 < np.mean((hu > 0) & (hu < 80)) < 0.5
    # tilted gantry: z is the position projected on the slice normal, not the raw z
    o = np.array(header.orientation)
    assert header.z == pytest.approx(np.dot(np.cross(o[:3], o[3:]), header.position))
    assert header.z != pytest.approx(header.position[2])


def write(path, hu=None, **kw):
    write_ct_slice(path, phantom(32) if hu is None else hu, **{**IDS, **kw})
    return path


def test_bits12_fix_recovers_hu(tmp_path):
    hu = phantom(32, lesion=True).round()
    header, got = read_hu(write(tmp_path / "a.dcm", hu, bits12_quirk=True))
    assert header.bits_stored == 12 and header.pixel_representation == 0 and header.needs_bits12_fix
    np.testing.assert_array_equal(got, np.clip(hu, -1000, 3071))
    # without the fix the air would read as bone: check the quirk is real
    raw = pydicom.dcmread(tmp_path / "a.dcm").pixel_array
    assert raw.max() > 3000


def test_padding_and_window_list(tmp_path):
    hu = phantom(32)
    mask = np.zeros_like(hu, dtype=bool)
    mask[:2] = True
    header, got = read_hu(write(tmp_path / "a.dcm", hu, padding_mask=mask, window_center=[36, 40],
                                window_width=[80, 90]))
    assert (header.window_center, header.window_width) == (36.0, 80.0)
    assert got[:2].min() == -1024 and got[:2].max() == -1024
    np.testing.assert_allclose(got[2:], np.clip(np.round(hu[2:]), -1024, 3071))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntax(tmp_path, syntax):
    hu = phantom(32, lesion=True)
    try:
        write(tmp_path / "c.dcm", hu, transfer_syntax=syntax)
    except Exception as exc:  # encoder missing is the writer's problem, not the reader's
        pytest.skip(f"cannot encode {syntax.name} here: {exc}")
    assert pydicom.dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == syntax
    _, plain = read_hu(write(tmp_path / "p.dcm", hu))
    _, comp = read_hu(tmp_path / "c.dcm")
    np.testing.assert_array_equal(plain, comp)


def _edit(path, fn):
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)
    return path


# the file-size cap follows max_pixels: 64 x 64 pixels allow 8 x 4096 bytes + 4 MiB of header
SMALL_MAX_PIXELS = 64 * 64


def make_bad(tmp_path, reason):
    """A file that must be rejected for `reason` when read with max_pixels=SMALL_MAX_PIXELS
    (the prepare tests reuse this)."""
    p = tmp_path / f"{reason}.dcm"
    if reason == "not_a_file":
        p.symlink_to(tmp_path / "nowhere.dcm")  # dangling
    elif reason == "too_large":
        good = write(p).read_bytes()
        p.write_bytes(good + bytes(5 << 20))  # 5 MB: more than any 64 x 64 slice takes
    elif reason == "not_dicom":
        p.write_text("this is not a DICOM file\n" * 10)
    elif reason == "unreadable":
        good = write(p).read_bytes()
        at = good.index(b"\x08\x00\x18\x00UI")  # the first data set element
        # an element of undefined length that is no sequence: pydicom cannot find its end
        bad = struct.pack("<HH2sHI", 0x0008, 0x0016, b"UN", 0, 0xFFFFFFFF) + b"\x01\x02\x03\x04" * 10
        p.write_bytes(good[:at] + bad + good[at:])
    elif reason == "truncated":
        good = write(p).read_bytes()
        p.write_bytes(good[:400])  # cut inside the header
    elif reason == "not_ct":
        _edit(write(p), lambda ds: setattr(ds, "Modality", "MR"))
    elif reason == "missing_uid":
        _edit(write(p), lambda ds: delattr(ds, "SeriesInstanceUID"))
    elif reason == "unsafe_id":
        write(p, sop_uid="../../evil")
    elif reason == "missing_position":
        _edit(write(p), lambda ds: delattr(ds, "ImagePositionPatient"))
    elif reason == "missing_rescale":
        _edit(write(p), lambda ds: delattr(ds, "RescaleIntercept"))
    elif reason == "no_pixel_data":
        _edit(write(p), lambda ds: delattr(ds, "PixelData"))
    elif reason == "pixel_decode_failed":
        # a whole PixelData element with fewer bytes than Rows x Columns needs
        _edit(write(p), lambda ds: setattr(ds, "PixelData", ds.PixelData[:-700]))
    elif reason == "bad_shape":
        def two_frames(ds):
            ds.NumberOfFrames = 2
            ds.PixelData = ds.PixelData * 2
        _edit(write(p), two_frames)
    elif reason == "unsupported_syntax":  # a deflate bomb: 64 MiB inflated from 65 kB
        from hostile import deflate_bomb
        p.write_bytes(deflate_bomb(64))
    return p


FILE_REASONS = [r for r in REASONS if r not in ("duplicate_id", "no_labels")]  # those need a whole set


@pytest.mark.parametrize("reason", FILE_REASONS)
def test_each_rejection_reason(tmp_path, reason):
    path = make_bad(tmp_path, reason)
    with pytest.raises(Rejected) as info:
        read_hu(path, max_pixels=SMALL_MAX_PIXELS)
    assert info.value.reason == reason, info.value


def test_header_pass_does_not_need_pixels(tmp_path):
    path = make_bad(tmp_path, "pixel_decode_failed")
    assert read_header(path).image_id == IDS["sop_uid"]


@pytest.mark.parametrize("kind", ["plain", "bits12", "list_window", "rle"])
def test_fast_paths_match_pydicom(tmp_path, kind, real_slice):
    """Raw-byte tag parsing and the native pixel view give exactly what pydicom gives."""
    from ich.dicom import read_stored
    path = {"plain": lambda: real_slice,
            "bits12": lambda: write(tmp_path / "a.dcm", bits12_quirk=True),
            "list_window": lambda: write(tmp_path / "a.dcm", window_center=[36, 40], window_width=[80, 90]),
            "rle": lambda: write(tmp_path / "a.dcm", transfer_syntax=RLELossless)}[kind]()
    header, stored = read_stored(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(stored, ds.pixel_array)
    assert stored.dtype == ds.pixel_array.dtype
    assert header.image_id == ds.SOPInstanceUID and header.series_id == ds.SeriesInstanceUID
    assert header.position == tuple(float(x) for x in ds.ImagePositionPatient)
    assert header.orientation == tuple(float(x) for x in ds.ImageOrientationPatient)
    assert (header.rows, header.cols, header.bits_stored) == (ds.Rows, ds.Columns, ds.BitsStored)
    wc = ds.WindowCenter
    assert header.window_center == float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
    assert header.intercept == float(ds.RescaleIntercept) and header.slope == float(ds.RescaleSlope)


def _pydicom_file_as_ct(name, dst):
    """One of pydicom's own test files, its encoding kept, with what prepare requires of a CT slice."""
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Modality = "CT"
    for keyword, value in (("RescaleSlope", "1"), ("RescaleIntercept", "-1024")):
        if keyword not in ds:
            setattr(ds, keyword, value)
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize("kind, in_place", [
    ("generated", True), ("bits12", True), ("real", True), ("ct_small", True), ("implicit", True),
    ("big_endian", False), ("rle", False), ("bytes_after_pixels", False)])
def test_pixels_in_place_equal_pydicom(tmp_path, kind, in_place, real_slice):
    """read_stored's common road (header parsed up to the pixels, the pixels a view of the file's own
    bytes) gives pydicom's pixel_array and the full read's header; what it cannot take (big endian,
    compressed, bytes after the pixel element) goes to pydicom and gives the same."""
    from pydicom.data import get_testdata_file

    from ich import dicom
    path = {"generated": lambda: write(tmp_path / "a.dcm"),
            "bits12": lambda: write(tmp_path / "a.dcm", bits12_quirk=True),
            "real": lambda: real_slice,
            "ct_small": lambda: get_testdata_file("CT_small.dcm"),  # trailing padding after its pixels
            "implicit": lambda: _pydicom_file_as_ct("MR_small_implicit.dcm", tmp_path / "a.dcm"),
            "big_endian": lambda: _pydicom_file_as_ct("MR_small_bigendian.dcm", tmp_path / "a.dcm"),
            "rle": lambda: write(tmp_path / "a.dcm", transfer_syntax=RLELossless),
            "bytes_after_pixels": lambda: tmp_path / "a.dcm"}[kind]()
    if kind == "bytes_after_pixels":  # an extra element after the pixels: the full read parses it
        write(path)
        pydicom.dcmread(path)  # a plain file first
        with open(path, "ab") as f:
            f.write(struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, 4) + b"\x01\x02\x03\x04")
    data = open(path, "rb").read()
    want = pydicom.dcmread(path).pixel_array
    full_header, full = dicom._read_stored_pydicom(path, len(data), dicom.MAX_PIXELS)
    assert (dicom._read_in_place(data, len(data), dicom.MAX_PIXELS) is not None) == in_place
    assert (dicom._read_in_place(path, len(data), dicom.MAX_PIXELS) is not None) == in_place
    for source in (path, data):
        header, stored = dicom.read_stored(source)
        assert stored.dtype == want.dtype and stored.shape == want.shape
        assert stored.tobytes() == want.tobytes() == full.tobytes()
        assert repr(header) == repr(full_header)
    if in_place:
        assert np.shares_memory(dicom.read_stored(data)[1], np.frombuffer(data, np.uint8))  # no copy


def test_pixels_in_place_rejects_as_the_full_read(tmp_path):
    """A file the common road would take but for a flaw gets the full read's reason: cut in its pixels
    (truncated), a header of another modality (not_ct)."""
    path = write(tmp_path / "a.dcm")
    data = open(path, "rb").read()
    for bad, reason in ((data[:-100], "truncated"), (data.replace(b"CT", b"MR", 1), "not_ct")):
        with pytest.raises(Rejected) as exc:
            read_hu(bad)
        assert exc.value.reason == reason
