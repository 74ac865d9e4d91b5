"""pipeline.sr: the study's DICOM SR (TID 1500) from source headers and a probability table."""
from __future__ import annotations

import copy
import io

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import sr_problems, sr_tools_missing
from ich.labels import LABELS
from pipeline.notice import NOTICE
from pipeline.sr import PROBABILITY, build_sr, is_uid, sr_bytes, valid_uid, write_sr

N = 5
MODEL = {"experiments": ["exp_a", "exp_b"], "folds": 5, "stage_two": "stack_v1", "oof_score": 0.0612}
OPTIONAL = ("AccessionNumber", "StudyDate", "ReferringPhysicianName", "StudyID")


@pytest.fixture
def headers(tmp_path) -> list[pydicom.Dataset]:
    """N copies of pydicom's CT slice as one series, written and read back without pixels."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(N):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImagePositionPatient = [0.0, 0.0, i * 5.0]
        ds.InstanceNumber = 100 - i  # a scanner's numbering need not follow z
        ds.save_as(tmp_path / f"{i}.dcm")
        out.append(pydicom.dcmread(tmp_path / f"{i}.dcm", stop_before_pixels=True))
    return out


@pytest.fixture
def table(headers) -> pd.DataFrame:
    rng = np.random.default_rng(12)
    frame = pd.DataFrame({"image_id": [h.SOPInstanceUID for h in headers], "slice_index": range(N),
                          "z": [float(h.ImagePositionPatient[2]) for h in headers]})
    for label in LABELS:
        frame[label] = rng.random(N)
    frame.loc[2, "subdural"] = 0.123456789012345678  # more digits than a DS holds
    frame.loc[3, "any"] = 1.0
    return frame


def _read_back(ds) -> tuple[pydicom.Dataset, hd.sr.ComprehensiveSR]:
    data = sr_bytes(ds)
    assert data[128:132] == b"DICM"  # preamble and file meta: a real DICOM file
    assert sr_problems(data) == []  # dsrdump and dciodvfy accept it (when installed)
    return pydicom.dcmread(io.BytesIO(data)), hd.sr.srread(io.BytesIO(data))


def _groups(sr) -> tuple[object, list]:
    groups = sr.content.get_image_measurement_groups()
    summary = [g for g in groups if g.tracking_identifier == "study summary"]
    assert len(summary) == 1
    return summary[0], [g for g in groups if g is not summary[0]]


def _items(item):
    """Every content item of the tree below (and including) a dataset."""
    yield item
    for child in item.get("ContentSequence", []):
        yield from _items(child)


def _measured(group, label) -> pydicom.Dataset:
    """The MeasuredValueSequence item of the group's (non-derived) measurement of a label, as stored."""
    items = [m for m in group.get_measurements(name=PROBABILITY[label])]
    assert len(items) == 1, f"{label}: {len(items)} measurements"
    return items[0][0].MeasuredValueSequence[0]  # Measurement is a template; [0] its NUM item


def test_round_trip_and_marking(headers, table):
    raw, sr = _read_back(build_sr(headers, table, model=MODEL))
    assert raw.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert raw.SOPClassUID == pydicom.uid.ComprehensiveSRStorage == sr.SOPClassUID
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert raw.VerificationFlag == "UNVERIFIED" and "VerifyingObserverSequence" not in raw
    assert raw.PreliminaryFlag == "PRELIMINARY"
    assert NOTICE in raw.SeriesDescription
    texts = [i.TextValue for i in _items(raw) if i.get("ValueType") == "TEXT"]
    assert NOTICE in texts
    assert any(t.startswith(f"Slices are numbered 1 to {N} by position along z") for t in texts)  # says which
    assert raw.Modality == "SR" and raw.SeriesNumber == 1 and raw.InstanceNumber == 1
    assert "research" in raw.Manufacturer
    # the private scheme is declared
    assert [s.CodingSchemeDesignator for s in raw.CodingSchemeIdentificationSequence] == ["99RSNAICH"]


def test_one_group_per_slice_with_the_table_values(headers, table):
    _, sr = _read_back(build_sr(headers, table, model=MODEL))
    summary, slices = _groups(sr)
    assert len(slices) == N
    for number, (row, header, group) in enumerate(zip(table.itertuples(), headers, slices), start=1):
        assert group.tracking_identifier.startswith(f"slice {number} (")  # 1-based, as the viewer shows it
        assert f", instance {header.InstanceNumber})" in group.tracking_identifier  # the scanner's beside it
        [source] = group.source_images
        assert source.referenced_sop_instance_uid == header.SOPInstanceUID
        assert source.referenced_sop_class_uid == header.SOPClassUID
        for label in LABELS:
            want = getattr(row, label)
            item = _measured(group, label)
            assert float(item.FloatingPointValue) == want  # FD: exact
            assert len(str(item.NumericValue)) <= 16  # DS: at most 16 characters ...
            assert float(item.NumericValue) == pytest.approx(want, abs=1e-13)  # ... about 14 digits
            unit = item.MeasurementUnitsCodeSequence[0]
            assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
    assert {m.name.meaning for m in slices[0].get_measurements()} == {PROBABILITY[lab].meaning for lab in LABELS}


def test_summary_holds_maxima_counts_and_algorithm(headers, table):
    _, sr = _read_back(build_sr(headers, table, model=MODEL, threshold=0.5))
    summary, _ = _groups(sr)
    for label in LABELS:
        item = _measured(summary, label)
        assert float(item.FloatingPointValue) == table[label].max()
    counts = {m.name.value: m.value for m in summary.get_measurements() if m.name.value.endswith("N")}
    assert counts == {PROBABILITY[lab].value + "N": float((table[lab] >= 0.5).sum()) for lab in LABELS}
    assert counts["ICHN"] >= 1  # row 3 has any = 1.0
    params = [i.TextValue for i in _items(summary[0]) if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert "experiments=exp_a,exp_b" in params and "stage_two=stack_v1" in params and "threshold=0.5" in params


def test_uids_and_patient_come_from_the_sources(headers, table):
    raw, sr = _read_back(build_sr(headers, table, model=MODEL))
    assert raw.StudyInstanceUID == headers[0].StudyInstanceUID
    assert raw.PatientID == headers[0].PatientID and raw.PatientName == headers[0].PatientName
    assert raw.SOPInstanceUID not in {h.SOPInstanceUID for h in headers}
    assert raw.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert raw.SOPInstanceUID != raw.SeriesInstanceUID
    assert {e[2] for e in sr.get_evidence()} == {h.SOPInstanceUID for h in headers}
    again = build_sr(headers, table, model=MODEL)
    assert again.SOPInstanceUID != raw.SOPInstanceUID and again.SeriesInstanceUID != raw.SeriesInstanceUID


def test_missing_optional_attributes_still_build(headers, table):
    for h in headers:
        for key in OPTIONAL:
            if key in h:
                delattr(h, key)
    kept = [set(h.keys()) for h in headers]
    raw, sr = _read_back(build_sr(headers, table, model=MODEL))
    assert [set(h.keys()) for h in headers] == kept  # the caller's headers are not changed
    for key in OPTIONAL:
        assert not raw.get(key)  # Type 2: present and empty
    assert len(_groups(sr)[1]) == N


def test_rsna_like_headers_without_sop_class_or_patient_name(headers, table):
    for h in headers:
        for key in ("SOPClassUID", "PatientName", "PatientSex", "PatientBirthDate", "StudyTime", *OPTIONAL):
            if key in h:
                delattr(h, key)
    raw, sr = _read_back(build_sr(headers, table, model={"experiments": ["x"], "folds": None,
                                                          "stage_two": None, "oof_score": None}))
    assert str(raw.PatientName) == ""
    [source] = _groups(sr)[1][0].source_images
    assert source.referenced_sop_class_uid == pydicom.uid.CTImageStorage  # from the file meta


def test_bad_inputs_raise_clear_errors(headers, table):
    with pytest.raises(ValueError, match=f"{N} source headers but {N - 1} table rows"):
        build_sr(headers, table.iloc[:-1], model=MODEL)
    with pytest.raises(ValueError, match=f"{N - 1} source headers but {N} table rows"):
        build_sr(headers[:-1], table, model=MODEL)
    bad = table.copy()
    bad.loc[1, "epidural"] = np.nan
    with pytest.raises(ValueError, match="row 1 .*outside"):
        build_sr(headers, bad, model=MODEL)
    with pytest.raises(ValueError, match="lacks columns.*subdural"):
        build_sr(headers, table.drop(columns="subdural"), model=MODEL)
    other = copy.deepcopy(headers)
    other[4].StudyInstanceUID = generate_uid()  # a scanner's quirk: built under the first slice's study, said so
    assert b"different StudyInstanceUIDs" in sr_bytes(build_sr(other, table, model=MODEL))


def test_write_sr(tmp_path, headers, table):
    ds = build_sr(headers, table, model=MODEL)
    path = write_sr(ds, tmp_path / "study_sr.dcm")
    assert path == tmp_path / "study_sr.dcm" and path.read_bytes() == sr_bytes(ds)
    assert hd.sr.srread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_the_dicom_validators_are_installed():
    """The SR checks above run dcmtk's dsrdump and dicom3tools' dciodvfy; say so when they cannot."""
    missing = sr_tools_missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: the SRs were not validated "
                    "(bash scripts/install_dicom_tools.sh, or apt-get install dcmtk dicom3tools)")
    # the checker itself sees a broken SR
    assert sr_problems(b"\0" * 200)


def test_kaggle_style_ids_give_a_valid_sr_that_keeps_them(headers, table):
    """RSNA's files carry ID_<hex> where DICOM wants UIDs: the SR maps them to 2.25 UIDs, keeps the IDs."""
    for i, h in enumerate(headers):
        h.SOPInstanceUID, h.StudyInstanceUID, h.SeriesInstanceUID = f"ID_{i:03d}ab9f", "ID_st0c1", "ID_se0c1"
    kept = [copy.deepcopy(h) for h in headers]
    raw, sr = _read_back(build_sr(headers, table, model=MODEL))  # dsrdump and dciodvfy run on it here
    assert [h.SOPInstanceUID for h in headers] == [h.SOPInstanceUID for h in kept]  # the caller's untouched
    assert raw.StudyInstanceUID == valid_uid("ID_st0c1") and raw.StudyInstanceUID.startswith("2.25.")
    assert is_uid(raw.StudyInstanceUID) and not is_uid("ID_st0c1") and valid_uid("1.2.3") == "1.2.3"
    refs = [source.referenced_sop_instance_uid for g in _groups(sr)[1] for source in g.source_images]
    assert refs == [valid_uid(h.SOPInstanceUID) for h in headers] and all(is_uid(r) for r in refs)
    assert {e[2] for e in sr.get_evidence()} == set(refs)
    again, _ = _read_back(build_sr(headers, table, model=MODEL))
    assert again.StudyInstanceUID == raw.StudyInstanceUID  # deterministic: the same ID, the same UID
    texts = " ".join(str(i.TextValue) for i in _items(raw) if i.get("ValueType") == "TEXT")
    assert all(f"source ID {h.SOPInstanceUID}" in texts for h in headers)  # the original IDs are kept
    assert "StudyInstanceUID ID_st0c1" in texts and "SeriesInstanceUID ID_se0c1" in texts
    assert [s.CodingSchemeDesignator for s in raw.CodingSchemeIdentificationSequence] == ["99RSNAICH"]


def test_threshold_counts(headers, table):
    _, sr = _read_back(build_sr(headers, table, model=MODEL, threshold=0.3))
    summary, _ = _groups(sr)
    counts = {m.name.value: m.value for m in summary.get_measurements() if m.name.value.endswith("N")}
    assert counts == {PROBABILITY[lab].value + "N": float((table[lab] >= 0.3).sum()) for lab in LABELS}


def test_outputs_number_slices_from_one_with_the_instance_number_beside(headers, table):
    from types import SimpleNamespace

    from pipeline.outputs import above_threshold, numbered
    got = numbered(SimpleNamespace(slices=table, headers=headers))
    assert got["slice_number"].tolist() == list(range(1, N + 1)) and "slice_index" not in got
    assert got["instance_number"].tolist() == [100 - i for i in range(N)]
    assert numbered(SimpleNamespace(slices=table, headers=None))["instance_number"].isna().all()
    runs = above_threshold(table.assign(any=[0.9, 0.1, 0.8, 0.7, 0.2]), 0.5)["any"]["runs"]
    assert runs == [[1, 1], [3, 4]]  # slice numbers, as the page's summary shows them


def _without_made_uids(ds: pydicom.Dataset) -> dict:
    """The dataset as JSON without what each build makes anew (its own UIDs, dates, tracking UIDs)."""
    out = ds.to_json_dict()
    for key in ("00080018", "0020000E", "00080012", "00080013", "00080023", "00080033", "0040A032", "0018A001"):
        out.pop(key, None)

    def walk(node):
        if isinstance(node, dict):
            if node.get("0040A040", {}).get("Value") == ["UIDREF"]:
                node.pop("0040A124", None)  # a tracking UID
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(out)
    return out


@pytest.mark.parametrize("kaggle_ids", [False, True])
def test_copied_slice_groups_equal_highdicoms_own(headers, table, kaggle_ids):
    """The fast build (highdicom's first slice group, copied for the others; the shared items written
    once) gives the same SR as highdicom building every group and pydicom writing it."""
    if kaggle_ids:
        for i, h in enumerate(headers):
            h.SOPInstanceUID, h.StudyInstanceUID, h.SeriesInstanceUID = f"ID_{i:03d}ab9f", "ID_st0c1", "ID_se0c1"
    fast, _ = _read_back(build_sr(headers, table, model=MODEL))
    reference = build_sr(headers, table, model=MODEL, copy_groups=False)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, reference, enforce_file_format=True)
    slow = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert _without_made_uids(fast) == _without_made_uids(slow)
    assert len(fast.ContentSequence[-1].ContentSequence) == N + 1  # summary + one group a slice
    uids = [i.UID for i in _items(fast) if i.get("ValueType") == "UIDREF"
            and i.ConceptNameCodeSequence[0].CodeValue == "112040"]
    assert len(set(uids)) == len(uids) == N + 1  # every group its own tracking UID


def test_a_replacing_sr_names_the_one_it_replaces(headers, table):
    first, _ = _read_back(build_sr(headers, table, model=MODEL))
    second, _ = _read_back(build_sr(headers, table, model=MODEL, replaces=[first]))
    [study] = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    [ref] = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert study.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    assert "PredecessorDocumentsSequence" not in first


@pytest.mark.parametrize("charset, name", [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "山田^太郎")])
def test_a_patient_name_in_another_character_set_survives(headers, table, charset, name):
    for h in headers:
        h.SpecificCharacterSet, h.PatientName = charset, name
    sr = build_sr(headers, table, model=MODEL)
    raw = pydicom.dcmread(io.BytesIO(sr_bytes(sr)))  # (the validators' output is not UTF-8 here)
    assert raw.SpecificCharacterSet == charset and str(raw.PatientName) == name
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    assert raw == pydicom.dcmread(io.BytesIO(buf.getvalue()))  # as pydicom's own writer encodes it
