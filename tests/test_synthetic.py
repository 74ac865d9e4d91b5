"""Tests of the synthetic dataset generator (the top-level package synthetic).

The rest of the pipeline trusts this data to have Kaggle's layout and the
real files' quirks, so these check the layout and csv contracts, the header
quirks one by one (12-bit fix recipe, -2000 padding, multi-valued windows,
compressed transfer syntax, the corrupt file), determinism, the series
geometry, and that labels match the lesions actually painted.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from ich.labels import LABELS, SUBTYPES, read_labels
from synthetic import generate_dataset, write_ct_slice
from synthetic.__main__ import main as cli_main
from synthetic.dicom_writer import dicom_uid
from synthetic.generate import series_phantom
from synthetic.phantom import HeadPhantom
from synthetic.plan import plan_dataset

REAL_SLICE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ID_0000ca2f6.dcm"
IDS = dict(sop_uid="ID_0123456ab", patient_id="ID_01234567", study_uid="ID_0123456789",
           series_uid="ID_abcdef0123")
KW = dict(n_train_patients=4, n_test_patients=2, image_size=64, seed=7, n_jobs=1, progress=False)


def read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ID_... UIDs are invalid on purpose
        return pydicom.dcmread(path, **kw)


def fixed_hu(ds) -> np.ndarray:
    """The reader's recipe for the broken 12-bit files, then rescale to HU."""
    x = ds.pixel_array.astype(np.int32)
    intercept = float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        x = x + 1000
        x[x >= 4096] -= 4096
        intercept = -1000.0
    return x * float(ds.RescaleSlope) + intercept


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate_dataset(out, **KW)
    return out, summary


def stems(folder: Path) -> set:
    return {p.stem for p in folder.glob("*.dcm")}


def test_layout_and_csvs(small):
    out, s = small
    train, test = stems(out / "stage_2_train"), stems(out / "stage_2_test")
    assert len(train) == s["train_images"] and len(test) == s["test_images"]
    assert not train & test
    assert all(len(i) == 12 and i.startswith("ID_") and int(i[3:], 16) >= 0 for i in train | test)

    raw = pd.read_csv(out / "stage_2_train.csv")
    assert list(raw.columns) == ["ID", "Label"]
    assert raw.duplicated().sum() == s["duplicate_rows"] > 0  # exact duplicates, like the real file
    dedup = raw.drop_duplicates()
    assert len(dedup) == 6 * len(train)
    wide = read_labels(out / "stage_2_train.csv")
    assert set(wide.index) == train

    sub = pd.read_csv(out / "stage_2_sample_submission.csv")
    assert list(sub.columns) == ["ID", "Label"] and (sub.Label == 0.5).all()
    assert set(sub.ID) == {f"{i}_{c}" for i in test for c in LABELS} and len(sub) == 6 * len(test)
    truth = read_labels(out / "stage_2_test_labels.csv")
    assert set(truth.index) == test
    assert list(pd.read_csv(out / "stage_2_test_labels.csv").ID) == list(sub.ID)


def test_summary(small):
    out, s = small
    assert s["train_patients"] == 4 and s["test_patients"] == 2 and s["patients"] == 6
    assert s["series"] == s["studies"] >= 6
    assert s["corrupt_files"] == 1 and s["bits12_files"] > 0 and s["seconds"] >= 0
    wide = read_labels(out / "stage_2_train.csv")
    assert s["positives"] == {c: int(wide[c].sum()) for c in LABELS}


def test_deterministic(small, tmp_path):
    out, _ = small
    generate_dataset(tmp_path / "again", **KW)
    a = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert a == b
    for rel in a:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = generate_dataset(tmp_path / "other", **{**KW, "seed": 8, "n_train_patients": 1, "n_test_patients": 0})
    assert not stems(tmp_path / "other" / "stage_2_train") & stems(out / "stage_2_train")
    assert other["train_images"] > 0


def test_labels_any_is_union_and_every_label_positive(small):
    out, _ = small
    wide = read_labels(out / "stage_2_train.csv")
    assert (wide["any"] == wide[list(SUBTYPES)].max(axis=1)).all()
    assert (wide.sum() > 0).all(), wide.sum()  # forced: every subtype in some train series
    truth = read_labels(out / "stage_2_test_labels.csv")
    assert (truth["any"] == truth[list(SUBTYPES)].max(axis=1)).all()


def test_series_geometry(small):
    out, _ = small
    series = defaultdict(list)
    studies = defaultdict(set)
    for p in (out / "stage_2_train").glob("*.dcm"):
        ds = read(p, stop_before_pixels=True)
        assert ds.SOPInstanceUID == p.stem and ds.Modality == "CT"
        o = np.array(ds.ImageOrientationPatient, float)
        z = float(np.dot(np.array(ds.ImagePositionPatient, float), np.cross(o[:3], o[3:])))
        series[ds.SeriesInstanceUID].append((z, ds.PatientID, tuple(o)))
        studies[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
    assert all(len(v) == 1 for v in studies.values())  # one axial series per study
    for uid, rows in series.items():
        assert 20 <= len(rows) <= 60, uid
        assert len({r[1] for r in rows}) == 1 and len({r[2] for r in rows}) == 1
        gaps = np.diff(sorted(r[0] for r in rows))
        assert 4.0 - 1e-2 <= gaps.min() and gaps.max() <= 6.0 + 1e-2
        assert gaps.max() - gaps.min() < 1e-2, uid  # constant spacing along the normal


def test_files_decode_to_the_phantom(small):
    """A quirk series and a 16-bit series give back the phantom's HU exactly."""
    out, _ = small
    plans = plan_dataset(**{k: KW[k] for k in ("n_train_patients", "n_test_patients", "image_size", "seed")})
    checked = set()
    for plan in plans:
        if plan.split != "train" or plan.bits12 in checked:
            continue
        head, noise = series_phantom(plan)
        hu, _ = head.render(np.arange(plan.n_slices), noise)
        for k in (0, plan.n_slices // 2):
            ds = read(out / "stage_2_train" / f"{plan.sop_ids[k]}.dcm")
            if plan.bits12:
                assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, 0.0)
                np.testing.assert_array_equal(fixed_hu(ds), np.clip(np.rint(hu[k]), -1000, 3095))
            else:
                assert (ds.BitsStored, ds.PixelRepresentation) == (16, 1)
                got = fixed_hu(ds)
                inside = ds.pixel_array != -2000
                np.testing.assert_array_equal(got[inside], np.rint(hu[k])[inside])
        checked.add(plan.bits12)
    assert checked == {True, False}


def test_lesions_are_blood_and_labelled():
    rng = np.random.default_rng(3)
    head = HeadPhantom(rng, size=128, pixel_spacing=1.8, n_slices=36, slice_spacing=5.0, subtypes=SUBTYPES)
    hu, masks = head.render(np.arange(36), None)
    labels = head.slice_labels(masks, 36)
    assert set(masks) == set(SUBTYPES)
    for subtype, mask in masks.items():
        assert labels[subtype].sum() >= 2, subtype  # spans neighbouring slices
        assert 50 <= np.median(hu[mask]) <= 90, subtype
        k = np.flatnonzero(labels[subtype])
        assert (np.diff(k) == 1).all() or subtype == "subarachnoid", subtype  # contiguous
    brain = hu[(hu > 15) & (hu < 45)]
    assert brain.size > 0.2 * hu.size
    noisy, _ = head.render(np.arange(36), np.random.default_rng(0))
    assert 5.0 * 128 / 512 - 0.2 < np.std(noisy - hu) < 8.0 * 128 / 512 + 0.2  # noise of a 4x downsampled 512 image


def test_prevalence_mid_sized():
    """Labels of a 100-patient plan (noise-free, 64 px, no files) land near the real prevalences."""
    plans = plan_dataset(n_train_patients=100, n_test_patients=0, image_size=64, seed=11)
    rows = []
    for plan in plans:
        head, _ = series_phantom(plan)
        _, masks = head.render(np.arange(plan.n_slices), None)
        lab = head.slice_labels(masks, plan.n_slices)
        rows.append(np.stack([lab.get(s, np.zeros(plan.n_slices, bool)) for s in SUBTYPES], axis=1))
    y = np.vstack(rows)
    prev = dict(zip(SUBTYPES, y.mean(axis=0)))
    prev["any"] = y.any(axis=1).mean()
    assert 0.08 <= prev["any"] <= 0.22, prev
    assert 0.0 < prev["epidural"] <= 0.03, prev
    for s in ("intraparenchymal", "intraventricular", "subarachnoid", "subdural"):
        assert 0.01 <= prev[s] <= 0.10, prev


def test_bits12_quirk_roundtrip(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 3096, size=(40, 48))
    hu[0, :4] = [-1000, 3095, -1, 0]
    write_ct_slice(tmp_path / "q.dcm", hu, bits12_quirk=True, **IDS)
    ds = read(tmp_path / "q.dcm")
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (12, 11, 0)
    assert float(ds.RescaleIntercept) == 0.0 and float(ds.RescaleSlope) == 1.0
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() < 4096
    np.testing.assert_array_equal(fixed_hu(ds), hu)
    with pytest.raises(ValueError):
        write_ct_slice(tmp_path / "p.dcm", hu, bits12_quirk=True, padding_mask=hu > 0, **IDS)


def test_padding_and_rescale(tmp_path):
    hu = np.full((32, 32), 35.0)
    pad = np.zeros((32, 32), bool)
    pad[:3] = True
    write_ct_slice(tmp_path / "p.dcm", hu, padding_mask=pad, **IDS)
    ds = read(tmp_path / "p.dcm")
    assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (16, 1, -1024.0)
    px = ds.pixel_array
    assert px.dtype == np.int16 and (px[pad] == -2000).all() and (px[~pad] == 35 + 1024).all()


def test_generated_padding(small):
    out, _ = small
    padded = 0
    for p in sorted((out / "stage_2_test").glob("*.dcm")) + sorted((out / "stage_2_train").glob("*.dcm"))[:60]:
        try:
            px = read(p).pixel_array
        except ValueError:
            continue  # the corrupt file
        if (px == -2000).any():
            padded += 1
            assert px[0, 0] == -2000 and px[32, 32] != -2000
    assert padded > 0


def test_window_tags(tmp_path):
    hu = np.zeros((16, 16))
    write_ct_slice(tmp_path / "m.dcm", hu, window_center=[36, 36], window_width=[80, 80], **IDS)
    write_ct_slice(tmp_path / "s.dcm", hu, window_center=40, window_width=80, **IDS)
    m, s = read(tmp_path / "m.dcm"), read(tmp_path / "s.dcm")
    assert isinstance(m.WindowCenter, pydicom.multival.MultiValue) and list(m.WindowCenter) == [36, 36]
    assert list(m.WindowWidth) == [80, 80]
    assert float(s.WindowCenter) == 40 and not isinstance(s.WindowCenter, pydicom.multival.MultiValue)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_slice(tmp_path, syntax):
    from pydicom.pixels import get_encoder

    if not get_encoder(syntax).is_available:
        pytest.skip(f"no encoder for {syntax.name}")
    hu = np.random.default_rng(1).normal(40, 300, (64, 64))
    pad = np.zeros((64, 64), bool)
    pad[:, :5] = True
    write_ct_slice(tmp_path / "plain.dcm", hu, padding_mask=pad, **IDS)
    write_ct_slice(tmp_path / "comp.dcm", hu, padding_mask=pad, transfer_syntax=syntax, **IDS)
    plain, comp = read(tmp_path / "plain.dcm"), read(tmp_path / "comp.dcm")
    assert comp.file_meta.TransferSyntaxUID == syntax and comp.SOPInstanceUID == IDS["sop_uid"]
    np.testing.assert_array_equal(comp.pixel_array, plain.pixel_array)


def test_corrupt_file(small):
    out, s = small
    (image_id,) = s["corrupt_ids"]
    path = out / "stage_2_train" / f"{image_id}.dcm"
    assert read(path, stop_before_pixels=True).SOPInstanceUID == image_id
    ds = read(path)
    with pytest.raises(Exception):
        ds.pixel_array
    assert image_id in read_labels(out / "stage_2_train.csv").index


@pytest.mark.skipif(not REAL_SLICE.exists(), reason="real competition slice not available")
def test_header_like_real_slice(tmp_path):
    real = read(REAL_SLICE)
    write_ct_slice(tmp_path / "x.dcm", np.zeros((512, 512)), position=(-125.0, -112.463, 110.602),
                   orientation=(1.0, 0.0, 0.0, 0.0, 0.920505, -0.390731), window_center=30, **IDS)
    ours = read(tmp_path / "x.dcm")
    assert [(e.tag, e.VR) for e in ours] == [(e.tag, e.VR) for e in real]
    assert [(e.tag, e.VR) for e in ours.file_meta] == [(e.tag, e.VR) for e in real.file_meta]
    assert ours.file_meta.TransferSyntaxUID == real.file_meta.TransferSyntaxUID
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "WindowCenter",
               "RescaleIntercept", "BitsStored", "PixelRepresentation"):
        assert str(ours[kw].value) == str(real[kw].value), kw
    assert ours.file_meta.MediaStorageSOPClassUID == real.file_meta.MediaStorageSOPClassUID
    assert pydicom.uid.UID(ours.file_meta.MediaStorageSOPInstanceUID).is_valid
    assert (tmp_path / "x.dcm").read_bytes()[128:132] == b"DICM"


def test_cli(tmp_path, capsys):
    assert cli_main(["--out", str(tmp_path), "--train-patients", "1", "--test-patients", "1",
                     "--size", "48", "--quiet", "--corrupt", "0"]) == 0
    text = capsys.readouterr().out
    assert "intraparenchymal" in text and "prevalence" in text
    assert (tmp_path / "stage_2_sample_submission.csv").exists()


def test_min_slices_gives_long_series():
    default = plan_dataset(n_train_patients=30, n_test_patients=5, image_size=64, seed=3)
    long = plan_dataset(n_train_patients=30, n_test_patients=5, image_size=64, seed=3, min_slices=40)
    assert min(p.n_slices for p in default) < 40 <= min(p.n_slices for p in long)
    assert max(p.n_slices for p in long) <= 60
    assert len(long) == len(default)  # the same number of studies and series


def test_dicom_uids_give_headers_a_pacs_accepts(small, tmp_path):
    """--dicom-uids: valid UIDs (the same ID_ name, the same UID), the SOP Class UID, the file meta's
    instance UID equal to the dataset's; the files, labels and pixels as the default layout's."""
    kaggle, _ = small
    assert cli_main(["--out", str(tmp_path), "--train-patients", str(KW["n_train_patients"]), "--test-patients",
                     str(KW["n_test_patients"]), "--size", str(KW["image_size"]), "--seed", str(KW["seed"]),
                     "--quiet", "--dicom-uids"]) == 0
    names = sorted(p.name for p in (tmp_path / "stage_2_test").glob("*.dcm"))
    assert names == sorted(p.name for p in (kaggle / "stage_2_test").glob("*.dcm")) and names
    for name in names[:10]:
        ours, theirs = pydicom.dcmread(tmp_path / "stage_2_test" / name), read(kaggle / "stage_2_test" / name)
        for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert pydicom.uid.UID(ours[key].value).is_valid, key
            assert ours[key].value == dicom_uid(theirs[key].value)
        assert ours.SOPClassUID == ours.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert ours.file_meta.MediaStorageSOPInstanceUID == ours.SOPInstanceUID
        assert "SOPClassUID" not in theirs  # the default keeps the real files' layout
        assert np.array_equal(ours.pixel_array, theirs.pixel_array)
    assert (tmp_path / "stage_2_train.csv").read_text() == (kaggle / "stage_2_train.csv").read_text()
