"""Write one CT slice as a DICOM file whose header looks like the competition's.

The header mirrors the real slice ``ID_0000ca2f6.dcm`` element for element
(same tags, VRs, value formatting and file meta written by dcm4che), so that
readers developed here meet on synthetic data the same surprises they meet on
Kaggle's files:

- SOPInstanceUID / StudyInstanceUID / SeriesInstanceUID are ``ID_<hex>``
  strings, not valid UIDs (pydicom warns about them on read);
- the file meta's MediaStorageSOPInstanceUID is a valid UID, unrelated to the
  file name (as in the real data);
- 16-bit signed pixels with RescaleIntercept -1024 and -2000 stored outside
  the scanner's circular field of view;
- WindowCenter / WindowWidth single-valued or multi-valued;
- the broken 12-bit files (``bits12_quirk``): BitsStored 12, unsigned, a
  RescaleIntercept of 0 that is wrong; the stored values are HU mod 4096, so
  the community fix "x = stored + 1000; x[x >= 4096] -= 4096; intercept =
  -1000" recovers HU exactly.

Like the real file, the dataset has no SOPClassUID element (0008,0016): CT
Image Storage is only in the file meta (MediaStorageSOPClassUID).

`dicom_uids=True` writes what a PACS accepts instead (`python -m synthetic
--dicom-uids`): valid UIDs under pydicom's registered root, made from the
`ID_<hex>` names (`dicom_uid`: the same name, the same UID), the SOPClassUID
element, and the file meta's MediaStorageSOPInstanceUID equal to the
SOPInstanceUID. DIMSE refuses the Kaggle layout (storescu and Orthanc will not
send a file without a SOP Class UID or with `ID_` UIDs).

Elements are built with validation switched off, which both silences the
``ID_...`` UID warnings and keeps a 512x512 slice at a few milliseconds.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_ROOT_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

PADDING_VALUE = -2000  # stored value of the outside-scanner padding in the real data
QUIRK_HU_RANGE = (-1000, 3095)  # the HU range the 12-bit fix recipe recovers exactly
# The real file's meta header was written by dcm4che; copying it keeps byte layouts alike.
IMPLEMENTATION_CLASS_UID = "1.2.40.0.13.1.1.1"
IMPLEMENTATION_VERSION = "dcm4che-1.4.35"
MEDIA_UID_PREFIX = "1.2.840.4267.32."  # root of the real file's MediaStorageSOPInstanceUID

_IGNORE = config.IGNORE


def media_uid(sop_uid: str) -> str:
    """A valid, deterministic MediaStorageSOPInstanceUID shaped like the real one (root + 39 digits)."""
    digest = int.from_bytes(hashlib.sha256(str(sop_uid).encode()).digest(), "big")
    return MEDIA_UID_PREFIX + str(digest % 10**39 or 1)


def dicom_uid(name: str) -> str:
    """A valid, deterministic UID for an `ID_<hex>` name, under pydicom's registered root."""
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["ich-synthetic", str(name)])


def _num(x: float, fmt: str = "") -> str:
    """DS text: integers without a decimal point ('40', like the real file), else ``fmt``."""
    x = float(x)
    if not fmt and x == int(x):
        return str(int(x))
    return format(x, fmt or ".6g")


def _ds(values, fmt: str = ""):
    """A DS value: one string, or a list of strings for a multi-valued element."""
    if isinstance(values, (Sequence, np.ndarray)) and not isinstance(values, str):
        return [_num(v, fmt) for v in values]
    return _num(values, fmt)


def _el(tag: int, vr: str, value) -> DataElement:
    return DataElement(tag, vr, value, validation_mode=_IGNORE)


def stored_pixels(hu, *, rescale_intercept=-1024.0, rescale_slope=1.0,
                  bits12_quirk=False, padding_mask=None) -> np.ndarray:
    """HU -> the stored pixel array (int16, or uint16 for the 12-bit quirk).

    Kept separate from the header code so that tests and readers can reason
    about the stored values without writing a file.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"hu must be a 2-D array, got shape {hu.shape}")
    if bits12_quirk:
        if padding_mask is not None:
            raise ValueError("bits12_quirk files carry no -2000 padding (the real ones do not)")
        lo, hi = QUIRK_HU_RANGE
        h = np.clip(np.rint(hu), lo, hi).astype(np.int32)
        return np.mod(h, 4096).astype(np.uint16)
    stored = np.rint((hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    stored = np.clip(stored, -32768, 32767).astype(np.int16)
    if padding_mask is not None:
        padding_mask = np.asarray(padding_mask, dtype=bool)
        if padding_mask.shape != stored.shape:
            raise ValueError(f"padding_mask shape {padding_mask.shape} != hu shape {stored.shape}")
        stored[padding_mask] = PADDING_VALUE
    return stored


def write_ct_slice(path, hu, *, sop_uid, patient_id, study_uid, series_uid,
                   position=(-125.0, -125.0, 0.0), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                   pixel_spacing=(0.488281, 0.488281), window_center=40, window_width=80,
                   rescale_intercept=-1024.0, rescale_slope=1.0, bits12_quirk=False,
                   padding_mask=None, transfer_syntax=None, dicom_uids=False) -> None:
    """Write ``hu`` (2-D Hounsfield units) as a CT DICOM at ``path``.

    See the module docstring for the header; ``transfer_syntax`` (a pydicom
    UID such as ``RLELossless`` or ``JPEG2000Lossless``) compresses the pixel
    data with ``Dataset.compress`` instead of writing Explicit VR Little Endian.
    dicom_uids: the three UIDs are valid UIDs (the caller's `dicom_uid`); write the SOPClassUID element
    and the SOPInstanceUID as the file meta's too (module docstring).
    """
    arr = stored_pixels(hu, rescale_intercept=rescale_intercept, rescale_slope=rescale_slope,
                        bits12_quirk=bits12_quirk, padding_mask=padding_mask)
    rows, cols = arr.shape
    if bits12_quirk:
        bits_stored, pixel_rep = 12, 0
        rescale_intercept, rescale_slope = 0.0, 1.0  # the wrong intercept of the real files
    else:
        bits_stored, pixel_rep = 16, 1

    meta = FileMetaDataset()
    meta.add(_el(0x00020000, "UL", 0))  # group length, filled in by dcmwrite
    meta.add(_el(0x00020001, "OB", b"\x00\x01"))
    meta.add(_el(0x00020002, "UI", CTImageStorage))
    meta.add(_el(0x00020003, "UI", str(sop_uid) if dicom_uids else media_uid(sop_uid)))
    meta.add(_el(0x00020010, "UI", ExplicitVRLittleEndian))
    meta.add(_el(0x00020012, "UI", IMPLEMENTATION_CLASS_UID))
    meta.add(_el(0x00020013, "SH", IMPLEMENTATION_VERSION))

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    if dicom_uids:
        ds.add(_el(0x00080016, "UI", CTImageStorage))
    ds.add(_el(0x00080018, "UI", str(sop_uid)))
    ds.add(_el(0x00080060, "CS", "CT"))
    ds.add(_el(0x00100020, "LO", str(patient_id)))
    ds.add(_el(0x0020000D, "UI", str(study_uid)))
    ds.add(_el(0x0020000E, "UI", str(series_uid)))
    ds.add(_el(0x00200010, "SH", ""))
    ds.add(_el(0x00200032, "DS", _ds(position, ".3f")))
    ds.add(_el(0x00200037, "DS", _ds(orientation, ".6f")))
    ds.add(_el(0x00280002, "US", 1))
    ds.add(_el(0x00280004, "CS", "MONOCHROME2"))
    ds.add(_el(0x00280010, "US", rows))
    ds.add(_el(0x00280011, "US", cols))
    ds.add(_el(0x00280030, "DS", _ds(pixel_spacing, ".6f")))
    ds.add(_el(0x00280100, "US", 16))
    ds.add(_el(0x00280101, "US", bits_stored))
    ds.add(_el(0x00280102, "US", bits_stored - 1))
    ds.add(_el(0x00280103, "US", pixel_rep))
    ds.add(_el(0x00281050, "DS", _ds(window_center)))
    ds.add(_el(0x00281051, "DS", _ds(window_width)))
    ds.add(_el(0x00281052, "DS", _ds(rescale_intercept)))
    ds.add(_el(0x00281053, "DS", _ds(rescale_slope)))
    ds.add(_el(0x7FE00010, "OW", arr.astype("<" + arr.dtype.str[1:], copy=False).tobytes()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if transfer_syntax is not None:
            # keep our SOPInstanceUID: compress() would otherwise mint a new one
            ds.compress(transfer_syntax, arr, generate_instance_uid=False)
        # enforce_file_format=True would overwrite MediaStorageSOPInstanceUID with the
        # ID_... SOPInstanceUID; the header above is already complete, write it as is.
        dcmwrite(Path(path), ds, enforce_file_format=False)
