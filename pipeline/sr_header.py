"""The source headers as the DICOM SR may copy them: fields a scanner wrote in another form are normalised
or left out, and each change is said (in the SR as a comment, in the JSON output as `header_notes`).

Why: highdicom copies the patient and study modules of the first slice and
checks them; a value in another format (StudyDate `2024-05-06`, StudyTime
`10:30`), a sex code outside M/F/O, or a series whose slices carry several
StudyInstanceUIDs made the SR fail for the whole study. Such a field says
nothing the probabilities need, so it is repaired where the intent is plain
(a date with separators, a time with colons, `male`) and left empty otherwise
(all are Type 2: empty is allowed). Several study UIDs: the report references
every slice under the first slice's study, and says so. Notes never quote a
value (they may be patient data); they name the field.
"""
from __future__ import annotations

import copy
import re
from datetime import datetime

import pydicom

DATES = ("StudyDate", "PatientBirthDate")
TIMES = ("StudyTime",)
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?")
_AS = re.compile(r"\d{3}[DWMY]")


def _date(value: str) -> str | None:
    """A DICOM DA (YYYYMMDD) from YYYYMMDD or year-first with '-', '.' or '/' separators; None otherwise."""
    digits = re.fullmatch(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})", value.strip())
    if not digits:
        return None
    text = "".join(digits.groups())
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return None
    return text


def _time(value: str) -> str | None:
    """A DICOM TM (HH[MM[SS[.F]]]) from itself or from HH:MM[:SS[.F]]; None otherwise."""
    text = value.strip()
    parts = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?", text)
    if parts:
        text = parts.group(1).zfill(2) + parts.group(2) + (parts.group(3) or "")
    return text if _TM.fullmatch(text) else None


def _fix(ds: pydicom.Dataset, keyword: str, repair) -> str | None:
    """Repair ds.<keyword> in place; -> a note when it changed (normalised or left out), else None."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    text = "" if value is None else str(value)
    if not text.strip():
        return None
    fixed = repair(text)
    if fixed == text:
        return None
    ds[keyword].value = fixed or None
    return f"{keyword} was not in DICOM form: " + ("normalised" if fixed else "left out")


def normalise(headers: list) -> tuple[list, list[str]]:
    """-> (headers the SR may copy, notes): the input list itself when nothing needs a change, else new
    datasets (the inputs stay untouched)."""
    notes = header_notes(headers)
    if not notes:
        return headers, []
    out = [copy.deepcopy(h) for h in headers]  # slim headers: a few fields each
    first = out[0]
    for keyword in DATES:
        _fix(first, keyword, _date)
    for keyword in TIMES:
        _fix(first, keyword, _time)
    _fix(first, "PatientSex", lambda v: _SEX.get(v.strip().upper()))
    _fix(first, "PatientAge", lambda v: v.strip() if _AS.fullmatch(v.strip()) else None)
    study = first.get("StudyInstanceUID")
    if study:
        for h in out[1:]:
            h.StudyInstanceUID = study
    return out, notes


def header_notes(headers: list) -> list[str]:
    """What `normalise` changes, in words, without the values."""
    if not headers:
        return []
    first = copy.deepcopy(headers[0])
    notes = [n for n in ([_fix(first, k, _date) for k in DATES] + [_fix(first, k, _time) for k in TIMES]
                         + [_fix(first, "PatientSex", lambda v: _SEX.get(v.strip().upper())),
                            _fix(first, "PatientAge", lambda v: v.strip() if _AS.fullmatch(v.strip()) else None)])
             if n]
    studies = {str(h.get("StudyInstanceUID") or "") for h in headers} - {""}
    if len(studies) > 1:
        notes.append(f"the slices carry {len(studies)} different StudyInstanceUIDs: this report references "
                     "every slice under the first slice's study")
    return notes


def comments(notes: list[str]) -> list:
    """The notes as the SR's TEXT "Comment" items (DCM 121106), for its summary group."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return [hd.sr.TextContentItem(name=codes.DCM.Comment, value=f"Source header: {n}.",
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for n in notes]
