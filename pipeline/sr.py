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
else as CT Image Storage. Valid source UIDs are kept, so the SR lands in the
source study in a PACS; only UIDs that are not valid are remapped (`valid_uid`).

Why the SR is built the way it is (at the speed of the model: a few ms a slice,
benchmarks/node.py): highdicom builds the document with the first slice's group
(so the structure is the library's), the other groups are copies of that one
with each slice's own values (`_GroupCopier`), and `sr_bytes` encodes the
elements the copies share once (`_Encoder`). Built group by group by highdicom
and written by pydicom, 200 slices took 6 to 15 s; `copy_groups=False` still
does that, and tests/test_sr.py holds both equal.
Nothing is logged; error messages name slices by position, never by UID.
"""
from __future__ import annotations

import io
import math
import re
import struct
import uuid
from pathlib import Path

import highdicom as hd
import pandas as pd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.datadict import tag_for_keyword
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.sr.codedict import codes
from pydicom.valuerep import DS
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ich.cache import write_atomic
from ich.labels import LABELS

from .notice import NOTICE  # one text for every output
from .sr_header import comments as header_comments, normalise as normalise_headers
MANUFACTURER = "ich-reference (research)"
SCHEME = "99RSNAICH"
DEVICE_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'ich-reference device observer').int}"  # same every run
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


def _slice_group(h, e, index, z, p) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One slice's TID 1501 group, built by highdicom (the template the other slices are copied from)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_slice_text(h, index, z)),
        measurements=[hd.sr.Measurement(name=PROBABILITY[lab], value=float(v), unit=UNIT)
                      for lab, v in zip(LABELS, p)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(e.SOPClassUID, e.SOPInstanceUID)])


def _slice_text(h, number, z) -> str:
    """'slice 25 (98.2 mm, instance 25)': the 1-based slice number, as the web viewer shows it, and the DICOM
    InstanceNumber where the file has one."""
    z = f"{float(z):g} mm" if z is not None and math.isfinite(float(z)) else "unknown z"
    instance = f", instance {h.InstanceNumber}" if h.get("InstanceNumber") not in (None, "") else ""
    source = "" if is_uid(str(h.SOPInstanceUID)) else f" source ID {h.SOPInstanceUID}"  # the original, kept
    return f"slice {int(number)} ({z}{instance}){source}"


_VARYING = frozenset({"ContentSequence", "MeasuredValueSequence", "ReferencedSOPSequence"})  # hold a slice's values


def _shallow_tree(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ds, new datasets down the sequences that hold a slice's values (`_VARYING`), sharing every
    other element (the code sequences, the leaf elements).

    Safe because the copies' differing values are set as new elements (`_set`), never by changing a
    shared one; many times cheaper than copy.deepcopy or building the group again with highdicom.
    """
    out = pydicom.Dataset()
    for elem in ds:
        if elem.VR == "SQ" and elem.keyword in _VARYING:
            elem = DataElement(elem.tag, "SQ", Sequence([_shallow_tree(item) for item in elem.value]))
        out._dict[elem.tag] = elem  # no private tags in these items: __setitem__'s checks have nothing to do
    return out


def _set(ds: pydicom.Dataset, keyword: str, vr: str, value) -> None:
    ds[keyword] = DataElement(tag_for_keyword(keyword), vr, value)


class _GroupCopier:
    """Makes slice groups as copies of the first one (highdicom's), with each slice's own values.

    Why: highdicom builds, deep-copies and searches every content item; at 200 slices that was most of
    the SR's time (about 10 ms a slice). The first slice's group is still highdicom's, so the structure
    (TID 1501: tracking identifier and UID, six NUM items, the source image) is the library's; the copies
    differ only in the tracking identifier and UID, the six values and the referenced image.
    """

    def __init__(self, template: pydicom.Dataset):
        self.template = template
        items = list(template.ContentSequence)
        code = [i.ConceptNameCodeSequence[0].CodeValue for i in items]
        self.ident, self.uid = code.index("112039"), code.index("112040")
        self.num = [code.index(PROBABILITY[lab].value) for lab in LABELS]
        self.image = [i.ValueType for i in items].index("IMAGE")

    def __call__(self, text: str, values, sop_class: str, sop_instance: str) -> pydicom.Dataset:
        group = _shallow_tree(self.template)
        items = group.ContentSequence
        _set(items[self.ident], "TextValue", "UT", text)
        _set(items[self.uid], "UID", "UI", hd.UID())
        for i, v in zip(self.num, values):
            measured = items[i].MeasuredValueSequence[0]
            _set(measured, "NumericValue", "DS", DS(float(v), auto_format=True))  # as highdicom writes it
            _set(measured, "FloatingPointValue", "FD", float(v))
        ref = items[self.image].ReferencedSOPSequence[0]
        _set(ref, "ReferencedSOPClassUID", "UI", sop_class)
        _set(ref, "ReferencedSOPInstanceUID", "UI", sop_instance)
        return group


def _add_evidence(sr: pydicom.Dataset, evidence: list[pydicom.Dataset]) -> None:
    """Reference `evidence` (one study) in the SR's Current Requested Procedure Evidence Sequence."""
    study = sr.CurrentRequestedProcedureEvidenceSequence[0]
    series = {s.SeriesInstanceUID: s for s in study.ReferencedSeriesSequence}
    for e in evidence:
        if e.SeriesInstanceUID not in series:
            item = pydicom.Dataset()
            item.SeriesInstanceUID, item.ReferencedSOPSequence = e.SeriesInstanceUID, Sequence()
            study.ReferencedSeriesSequence.append(item)
            series[e.SeriesInstanceUID] = item
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = e.SOPClassUID, e.SOPInstanceUID
        series[e.SeriesInstanceUID].ReferencedSOPSequence.append(ref)


def build_sr(headers: list[pydicom.Dataset], table: pd.DataFrame, *, model: dict,
             threshold: float = 0.5, replaces: list[pydicom.Dataset] | None = None,
             uids: tuple[str, str] | None = None, notes: list[str] = (),
             copy_groups: bool = True) -> hd.sr.ComprehensiveSR:
    """Comprehensive SR (TID 1500) of a study: summary group, then one group per table row (= header).

    replaces: earlier SRs of the same series that this one supersedes (e.g. the node's report after late
    slices arrived), listed in its Predecessor Documents Sequence (their Study, Series, SOP Instance and
    SOP Class UIDs are enough).
    uids: the SR's (series, SOP instance) UIDs when the caller must make the same SR again with the same
    identity (the DICOM node after a restart); default: new ones.
    notes: more comments for the summary group (e.g. the files not used and why).
    copy_groups: False builds every slice's group with highdicom (about 7 times slower): the reference
    that tests/test_sr.py holds the copies equal to and benchmarks/node.py times them against.
    """
    if len(headers) != len(table):
        raise ValueError(f"build_sr: {len(headers)} source headers but {len(table)} table rows; "
                         "they must be the same slices in the same order")
    if len(table) == 0:
        raise ValueError("build_sr: no slices")
    missing = [c for c in ("z", *LABELS) if c not in table.columns]
    if missing:
        raise ValueError(f"build_sr: table lacks columns {missing}")
    probs = table[list(LABELS)].to_numpy(dtype=float)
    bad = ~((probs >= 0) & (probs <= 1))  # NaN too
    if bad.any():
        row = int(bad.any(axis=1).argmax())
        raise ValueError(f"build_sr: slice at row {row} has a probability outside [0, 1] (or NaN)")
    headers, header_notes = normalise_headers(headers)  # odd dates, times, sex codes, several study UIDs
    evidence = _evidence(headers)
    # slice N is the 1-based position in z order (the table's rows), as the web viewer and the CSV number it
    indices, zs = list(range(1, len(table) + 1)), table["z"].tolist()

    n_built = 1 if copy_groups else len(table)
    built = [_slice_group(*row) for row in zip(headers[:n_built], evidence, indices, zs, probs)]
    top, above = probs.max(axis=0), (probs >= threshold).sum(axis=0)
    summary = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="study summary"),
        algorithm_id=_algorithm(model, (f"threshold={threshold:g}", f"slices={len(table)}")),
        measurements=[hd.sr.Measurement(name=PROBABILITY[lab], value=float(v), unit=UNIT,
                                        derivation=codes.SCT.Maximum) for lab, v in zip(LABELS, top)]
        + [hd.sr.Measurement(name=COUNT[lab], value=int(n), unit=SLICES) for lab, n in zip(LABELS, above)])
    summary[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=NOTICE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    summary[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        value=f"Slices are numbered 1 to {len(table)} by position along z (foot to head), as the web viewer "
              "and the CSV number them; each slice's DICOM InstanceNumber follows it where present."))
    summary[0].ContentSequence.extend(header_comments(header_notes))
    for note in notes:
        summary[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
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
        imaging_measurements=[summary, *built])
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence[:n_built], content=report[0], series_instance_uid=uids[0] if uids else hd.UID(),
        series_number=1, sop_instance_uid=uids[1] if uids else hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"ICH probabilities. {NOTICE}", previous_versions=replaces or None,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=SCHEME, name="ich-reference private codes for RSNA ICH labels")])
    if not copy_groups or len(table) == 1:
        return sr
    # the other slices: copies of the first slice's group, and their images in the evidence
    container = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER")
    groups = list(container.ContentSequence)  # highdicom's sequence takes its own items only: a plain one
    copy_group = _GroupCopier(groups[-1])
    groups += [copy_group(_slice_text(h, index, z), p, e.SOPClassUID, e.SOPInstanceUID)
               for h, e, index, z, p in zip(headers[1:], evidence[1:], indices[1:], zs[1:], probs[1:])]
    container["ContentSequence"] = DataElement(tag_for_keyword("ContentSequence"), "SQ", Sequence(groups))
    _add_evidence(sr, evidence[1:])
    return sr


_CHARSET = Tag(0x0008, 0x0005)
_ITEM, _ITEM_END, _SEQ_END = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\0\0\0\0", b"\xfe\xff\xdd\xe0\0\0\0\0"


class _Encoder:
    """A dataset's explicit VR little endian bytes, each leaf element encoded by pydicom once.

    Why: pydicom's writer redoes every element of every item and checks every item for ambiguous VRs
    (about 40 us an element; the slice groups hold 120 elements a slice, most of them the code items
    that `_GroupCopier`'s copies share): this keeps the bytes of each shared element and frames
    sequences and items with undefined lengths, which pydicom reads as it reads its own. An element
    pydicom cannot write as it stands (an ambiguous VR) raises ValueError: `sr_bytes` then lets
    pydicom write the whole file.
    """

    def __init__(self):
        self.done = {}

    def element(self, elem, encodings) -> bytes:
        if elem.VR == "SQ":
            tag = struct.pack("<HH", elem.tag.group, elem.tag.element)
            return tag + b"SQ\0\0\xff\xff\xff\xff" + b"".join(
                _ITEM + self.dataset(item, encodings) + _ITEM_END for item in elem.value) + _SEQ_END
        key = id(elem)
        if key not in self.done:
            self.done[key] = (elem, self._leaf(elem, encodings))  # elem kept: its id stays its own while cached
        return self.done[key][1]

    @staticmethod
    def _leaf(elem, encodings) -> bytes:
        value, tag = elem.value, struct.pack("<HH", elem.tag.group, elem.tag.element)
        if elem.VR == "UI" and isinstance(value, str) and value:  # the UIDs that differ in each copy
            data = value.encode("ascii")
            data += b"\0" * (len(data) % 2)
            return tag + b"UI" + struct.pack("<H", len(data)) + data
        if elem.VR == "FD" and isinstance(value, float):  # the exact probabilities
            return tag + b"FD\x08\0" + struct.pack("<d", value)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        return fp.getvalue()

    def dataset(self, ds: pydicom.Dataset, encodings) -> bytes:
        items = ds._dict
        charset = items.get(_CHARSET)
        if charset is not None:
            encodings = ds[_CHARSET].value or encodings
        return b"".join(self.element(ds[tag] if items[tag].is_raw else items[tag], encodings)
                        for tag in sorted(items) if not (tag.element == 0 and tag.group > 6))


def sr_bytes(ds: pydicom.Dataset) -> bytes:
    """The SR as a DICOM file (preamble, file meta, explicit VR little endian) in memory."""
    if ds.file_meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian:
        try:
            body = _Encoder().dataset(ds, "iso8859")
        except ValueError:
            pass
        else:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            fp.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
            return fp.getvalue() + body
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_sr(ds: pydicom.Dataset, path: str | Path) -> Path:
    """Write the SR file atomically; the caller picks a name without patient data."""
    path = Path(path)
    data = sr_bytes(ds)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path
