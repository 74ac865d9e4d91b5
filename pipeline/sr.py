"""The study's probabilities as a DICOM Structured Report (highdicom, TID 1500).

Why TID 1500: the "Imaging Measurement Report" is the DICOM template that
viewers, PACS and archives already know for machine-made numbers about images.
Each slice gets one TID 1501 measurement group: the six probabilities as NUM
items (UCUM "1", dimensionless) and the slice's image as the group's source
image. A first "study summary" group holds, per label, the highest slice
probability (derivation SCT 56851009 "Maximum") and the number of slices at or
above `threshold`, the algorithm (TID 4019: name, version, parameters from
`model`; said once here, not in each slice group, which halves the build
time) and the notice as a TEXT "Comment" (DCM 121106; TID 1500/1501 are
extensible). The observer is a device: the model. The document is a
Comprehensive SR: there are no 3D coordinates, and it is the most widely
supported class. No Image Library (TID 1600, optional): each group's source
image and the evidence sequence already reference every slice.

Why private codes: DICOM and SNOMED have no concept "probability of subdural
haemorrhage from this model", and the hemorrhage subtypes are not in
pydicom's or highdicom's code dictionaries (only SCT 1386000 "Intracranial
hemorrhage" is, and it names a disorder, not a probability). Rather than
invent codes that look standard, the six concepts use the private scheme
`99RSNAICH` (declared in the Coding Scheme Identification Sequence).
Everything else uses codes checked in pydicom's dictionary: UCUM "1", DCM
121106 "Comment", SCT 56851009 "Maximum", LN 25045-6 "CT unspecified body
region" (procedure reported, CID 100).

Why UNVERIFIED (and PRELIMINARY): no person has checked these numbers and
the models are not a medical device; NOTICE is also in the SeriesDescription
so a study browser shows it. (ContentQualification RESEARCH is not used: that
attribute is not part of the SR IODs.)

Patient and study attributes are copied from the first header by highdicom;
absent Type 2 ones (RSNA's anonymised files have no PatientName, StudyDate,
...) are written empty; a missing SOPClassUID is taken from the file meta,
else as CT Image Storage.
Nothing is logged; error messages name slices by position, never by UID.
"""
from __future__ import annotations

import io
import math
import re
import uuid
from pathlib import Path

import highdicom as hd
import pandas as pd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from ich.cache import write_atomic
from ich.labels import LABELS

from .notice import NOTICE  # one text for every output
from .sr_header import comments as header_comments, normalise as normalise_headers
MANUFACTURER = "ich-reference (research)"
SCHEME = "99RSNAICH"
DEVICE_UID = generate_uid(prefix=None, entropy_srcs=["ich-reference device observer"])  # same every run
_WORDS = {"epidural": ("EDH", "epidural hemorrhage"),
          "intraparenchymal": ("IPH", "intraparenchymal hemorrhage"),
          "intraventricular": ("IVH", "intraventricular hemorrhage"),
          "subarachnoid": ("SAH", "subarachnoid hemorrhage"),
          "subdural": ("SDH", "subdural hemorrhage"),
          "any": ("ICH", "any intracranial hemorrhage")}
PROBABILITY = {lab: hd.sr.CodedConcept(_WORDS[lab][0], SCHEME, f"Probability of {_WORDS[lab][1]}") for lab in LABELS}
COUNT = {lab: hd.sr.CodedConcept(f"{_WORDS[lab][0]}N", SCHEME, f"Slices with {_WORDS[lab][1]} probability >= threshold")
         for lab in LABELS}  # meanings stay within LO's 64 characters
UNIT = codes.UCUM.NoUnits  # "1"
SLICES = hd.sr.CodedConcept("{slices}", "UCUM", "slices")
# Type 2 attributes highdicom reads from the first header without a default.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def is_uid(value) -> bool:
    """A valid DICOM UID: dot-separated numbers without leading zeros, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def valid_uid(value: str) -> str:
    """value if it is a valid UID, else a deterministic one: "2.25." + the integer of the UUID5 of value.

    Kaggle's RSNA files carry `ID_<hex>` where DICOM expects UIDs; an SR that
    copies them is refused by DICOM readers (dcmtk's dsrdump, dciodvfy). The
    same ID always maps to the same UID (the SR's references stay
    consistent across SRs of one study); the original ID is kept in the
    SR's content (each slice group's tracking identifier, a summary comment).
    """
    value = str(value)
    return value if is_uid(value) else f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, value).int}"


def _evidence(headers: list) -> list[pydicom.Dataset]:
    """What highdicom needs of the headers, in new datasets (the headers stay untouched); ValueError if a UID lacks.

    All of the first header (highdicom copies its patient and study modules), only the UIDs of the others.
    UIDs that are not valid DICOM UIDs (Kaggle's `ID_<hex>`) are mapped by valid_uid.
    """
    out = []
    for i, h in enumerate(headers):
        missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not h.get(k)]
        if missing:
            raise ValueError(f"source header {i} has no {', '.join(missing)}")
        e = pydicom.Dataset()
        if i == 0:
            e.update(h)  # Dataset(h) and copy.copy(h) would share h's element dict, and change h
            for key in (*_UID_KEYS, "SOPClassUID"):  # update shares h's elements: new ones, h stays as it is
                if key in e:
                    del e[key]
            for key in _TYPE2:
                if key not in e:
                    setattr(e, key, None)
        e.StudyInstanceUID, e.SeriesInstanceUID, e.SOPInstanceUID = (
            valid_uid(h.StudyInstanceUID), valid_uid(h.SeriesInstanceUID), valid_uid(h.SOPInstanceUID))
        # RSNA's files have it only in the file meta
        meta = getattr(h, "file_meta", None) or pydicom.Dataset()
        e.SOPClassUID = h.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or CTImageStorage
        out.append(e)
    if len({e.StudyInstanceUID for e in out}) != 1:
        raise ValueError(f"the {len(out)} source headers belong to more than one study")
    return out


def _algorithm(model: dict, extra: tuple[str, ...] = ()) -> hd.sr.AlgorithmIdentification:
    params = [f"experiments={','.join(map(str, model.get('experiments') or []))}",
              f"folds={model.get('folds')}", f"stage_two={model.get('stage_two')}",
              f"oof_score={model.get('oof_score')}", *extra]
    return hd.sr.AlgorithmIdentification(name="ich-reference", version=str(model.get("stage_two") or "unknown"),
                                          parameters=params, manufacturer=MANUFACTURER)


def build_sr(headers: list[pydicom.Dataset], table: pd.DataFrame, *, model: dict,
             threshold: float = 0.5) -> hd.sr.ComprehensiveSR:
    """Comprehensive SR (TID 1500) of a study: summary group, then one group per table row (= header)."""
    if len(headers) != len(table):
        raise ValueError(f"build_sr: {len(headers)} source headers but {len(table)} table rows; "
                         "they must be the same slices in the same order")
    if len(table) == 0:
        raise ValueError("build_sr: no slices")
    missing = [c for c in ("slice_index", "z", *LABELS) if c not in table.columns]
    if missing:
        raise ValueError(f"build_sr: table lacks columns {missing}")
    probs = table[list(LABELS)].to_numpy(dtype=float)
    bad = ~((probs >= 0) & (probs <= 1))  # NaN too
    if bad.any():
        row = int(bad.any(axis=1).argmax())
        raise ValueError(f"build_sr: slice at row {row} has a probability outside [0, 1] (or NaN)")
    headers, header_notes = normalise_headers(headers)  # odd dates, times, sex codes, several study UIDs
    evidence = _evidence(headers)

    groups = []
    for h, e, index, z, p in zip(headers, evidence, table["slice_index"], table["z"], probs):
        z = f"{float(z):g} mm" if z is not None and math.isfinite(float(z)) else "unknown z"
        source = "" if is_uid(str(h.SOPInstanceUID)) else f" source ID {h.SOPInstanceUID}"  # the original, kept
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"slice {int(index)} ({z}){source}"),
            measurements=[hd.sr.Measurement(name=PROBABILITY[lab], value=float(v), unit=UNIT)
                          for lab, v in zip(LABELS, p)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(e.SOPClassUID, e.SOPInstanceUID)]))
    top, above = probs.max(axis=0), (probs >= threshold).sum(axis=0)
    summary = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="study summary"),
        algorithm_id=_algorithm(model, (f"threshold={threshold:g}", f"slices={len(table)}")),
        measurements=[hd.sr.Measurement(name=PROBABILITY[lab], value=float(v), unit=UNIT,
                                        derivation=codes.SCT.Maximum) for lab, v in zip(LABELS, top)]
        + [hd.sr.Measurement(name=COUNT[lab], value=int(n), unit=SLICES) for lab, n in zip(LABELS, above)])
    summary[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=NOTICE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    summary[0].ContentSequence.extend(header_comments(header_notes))
    mapped = [f"{k} {headers[0].get(k)}" for k in _UID_KEYS[:2] if not is_uid(str(headers[0].get(k)))]
    if mapped or any(not is_uid(str(h.SOPInstanceUID)) for h in headers):
        summary[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            value="The source files' identifiers are not DICOM UIDs; this report references them by "
                  "2.25 UIDs made from each identifier (UUID5). Source: " + ", ".join(mapped or ["-"])
                  + "; each slice's source ID is in its group's tracking identifier."))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=DEVICE_UID, name="ich-reference", manufacturer_name=MANUFACTURER,
                    model_name=str(model.get("stage_two") or "unknown")))),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
        imaging_measurements=[summary, *groups])
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"ICH probabilities. {NOTICE}",
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=SCHEME, name="ich-reference private codes for RSNA ICH labels")])


def sr_bytes(ds: pydicom.Dataset) -> bytes:
    """The SR as a DICOM file (preamble, file meta, explicit VR little endian) in memory."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_sr(ds: pydicom.Dataset, path: str | Path) -> Path:
    """Write the SR file atomically; the caller picks a name without patient data."""
    path = Path(path)
    data = sr_bytes(ds)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path
