"""The header fields a study result keeps of each slice, read without the rest of the file.

Why: a result stays in memory for the web viewer, and a DICOM header may
carry anything (a 100 MiB private element, a huge comment). The outputs need
the SR's patient and study modules, the UIDs and the viewer's study line;
only those are read, the other elements are skipped unread, and a value
longer than HEADER_VALUE_BYTES is dropped. No torch here: the web app's
reading processes import it.
"""
from __future__ import annotations

import io

import pydicom

from ich.dicom import MAX_PIXELS, max_file_bytes
from ich.rawdata import Member

HEADER_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "InstanceNumber", "SeriesDescription", "SliceThickness", "Rows", "Columns",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription")
HEADER_VALUE_BYTES = 1024


def slim_header(path) -> pydicom.Dataset:
    """A slice's header fields a result keeps (HEADER_KEYWORDS), read from its file (a path, or a zip's
    Member): the other elements are skipped unread, and a long value is dropped, so a kept header never
    holds a file's bulk. A member is read as its bytes (a BytesIO), which pydicom keeps in the dataset it
    returns (`buffer`, for deferred values): let go here, or each kept header holds its whole file (measured:
    8 uploads of 7 slices of 4096 x 4096 held +1.8 GB in the server's process, 224 MB a result, pickled
    there from the reading process)."""
    if isinstance(path, Member):  # a study zip's member, read in place (ich.study.zip_members)
        path = io.BytesIO(path.read(max_file_bytes(MAX_PIXELS)))
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS),
                         defer_size=HEADER_VALUE_BYTES)
    for tag in list(ds.keys()):
        if (getattr(ds.get_item(tag), "length", 0) or 0) > HEADER_VALUE_BYTES:
            del ds[tag]
    for name in ("buffer", "filename"):  # the file object it was read from: a member's whole bytes
        if isinstance(getattr(ds, name, None), io.IOBase):
            setattr(ds, name, None)
    meta = pydicom.dataset.FileMetaDataset()
    sop_class = getattr(ds, "file_meta", pydicom.Dataset()).get("MediaStorageSOPClassUID")
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta = meta
    return ds
