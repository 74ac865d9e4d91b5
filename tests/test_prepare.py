"""prepare_data end to end on a small hand-made raw folder."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import SETTINGS_TEMPLATE, write_labels, write_series
from ich import cache
from ich.config import PrepareConfig
from ich.dicom import REASONS, read_stored
from ich.image import process_slice
from ich.labels import LABELS, LabelsError
from ich.prepare import PrepareError, prepare_split
from test_dicom import FILE_REASONS, SMALL_MAX_PIXELS, make_bad

CFG = PrepareConfig(image_size=32, n_folds=3, n_jobs=2, chunk_size=7, max_pixels=SMALL_MAX_PIXELS)


@pytest.fixture
def raw(tmp_path):
    """3 train patients (one with two studies, one tilted, one descending), bad files of every kind."""
    train = tmp_path / "raw" / "stage_2_train"
    order = {}
    order["ID_se1"] = write_series(train, series="ID_se1", patient="ID_p1", n=7, first_id=1)
    order["ID_se2"] = write_series(train, series="ID_se2", patient="ID_p1", n=5, first_id=2, tilt=True)
    order["ID_se3"] = write_series(train, series="ID_se3", patient="ID_p2", n=6, first_id=3, descending=True)
    order["ID_se4"] = write_series(train, series="ID_se4", patient="ID_p3", n=4, first_id=4, bits12_quirk=True)
    ids = [i for v in order.values() for i in v]
    # the same image_id twice (the file name without .dcm is the image_id): the first in name order is kept
    shutil.copy(train / f"{ids[0]}.dcm", train / ids[0])
    # an image without labels
    write_series(train, series="ID_se9", patient="ID_p9", n=1, first_id=9)
    for reason in FILE_REASONS:
        make_bad(train, reason)
    write_labels(tmp_path / "raw" / "stage_2_train.csv", ids)
    test = tmp_path / "raw" / "stage_2_test"
    write_series(test, series="ID_te1", patient="ID_p7", n=5, first_id=5)
    return tmp_path / "raw", order


def test_train_contract(raw, tmp_path):
    raw_dir, order = raw
    before = sorted(p for p in tmp_path.rglob("*"))
    summary = prepare_split(raw_dir, tmp_path / "clean", "train", CFG, progress=False)
    clean = tmp_path / "clean"
    # nothing written outside the clean dir
    after = sorted(p for p in tmp_path.rglob("*") if clean not in p.parents and p != clean)
    assert after == before

    slices = pd.read_parquet(clean / "slices.parquet")
    expected_cols = ["image_id", "patient_id", "study_id", "series_id", "z", "slice_index", "n_slices",
                     *LABELS, "fold", "cache_row", "brain_fraction", "fixes"]
    assert set(expected_cols) <= set(slices.columns)
    assert len(slices) == 22 and slices["image_id"].is_unique
    # series order follows z (tilted and descending series included), not file names
    for series, ids in order.items():
        got = slices[slices.series_id == series].sort_values("slice_index")
        assert got["image_id"].tolist() == ids, series
        assert got["n_slices"].eq(len(ids)).all()
        assert np.all(np.diff(got["z"]) > 0)
    # patient-grouped folds
    assert (slices.groupby("patient_id")["fold"].nunique() == 1).all()
    # labels joined from the csv
    labels = pd.read_csv(raw_dir / "stage_2_train.csv")
    one = slices.iloc[3]
    for label in LABELS:
        assert one[label] == labels.set_index("ID").loc[f"{one.image_id}_{label}", "Label"]
    assert set(slices.loc[slices.series_id == "ID_se4", "fixes"]) == {"bits12"}

    rejected = pd.read_csv(clean / "rejected.csv")
    assert set(rejected["reason"]) == set(REASONS)
    dup = rejected.loc[rejected.reason == "duplicate_id", "detail"].tolist()
    assert dup == [f"same image_id as {order['ID_se1'][0]}"]
    # an image whose pixels fail but whose header is fine keeps its place (predict's fallback uses it)
    broken = rejected[rejected.reason == "pixel_decode_failed"].iloc[0]
    assert broken.series_id == "ID_se1" and np.isfinite(broken.z)
    assert pd.isna(rejected[rejected.reason == "not_dicom"].iloc[0].series_id)
    assert summary.rejected == rejected["reason"].value_counts().to_dict()
    assert summary.n_images == 22 and summary.n_series == 4 and summary.n_patients == 3
    text = "\n".join(summary.lines())
    assert f"rejected: {len(FILE_REASONS) + 2}" in text and "bits12 4" in text

    # the cache row of an image holds exactly what process_slice makes of its file
    images = cache.open_images(clean)
    assert images.shape == (summary.n_files, 32, 32, 3)
    row = slices.iloc[10]
    header, stored = read_stored(raw_dir / "stage_2_train" / row["file"])
    want, _ = process_slice(stored, header, size=32, windows=CFG.windows)
    np.testing.assert_array_equal(images[row["cache_row"]], want)


def test_resume_force_and_changed_settings(raw, tmp_path):
    raw_dir, _ = raw
    clean = tmp_path / "clean"
    prepare_split(raw_dir, clean, "train", CFG, progress=False)
    first = pd.read_parquet(clean / "slices.parquet")
    parts = sorted((clean / "parts").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    # a killed run: one chunk's result is missing -> only that chunk is redone
    parts[1].unlink()
    s = prepare_split(raw_dir, clean, "train", CFG, progress=False)
    assert s.chunks_done_before == len(parts) - 1
    assert {p.name: p.stat().st_mtime_ns for p in sorted((clean / "parts").iterdir()) if p != parts[1]} == \
        {k: v for k, v in mtimes.items() if k != parts[1].name}
    pd.testing.assert_frame_equal(pd.read_parquet(clean / "slices.parquet"), first)
    # other cache settings: refuse, say --force, lose nothing
    with pytest.raises(PrepareError, match="image_size.*--force"):
        prepare_split(raw_dir, clean, "train", PrepareConfig(image_size=48, chunk_size=7), progress=False)
    assert cache.open_images(clean).shape[1] == 32
    s = prepare_split(raw_dir, clean, "train", PrepareConfig(image_size=48, chunk_size=7, n_folds=3),
                      force=True, progress=False)
    assert s.chunks_done_before == 0 and cache.open_images(clean).shape[1] == 48
    assert json.loads((clean / "cache_meta.json").read_text())["image_size"] == 48


def test_test_split_has_no_labels_or_folds(raw, tmp_path):
    raw_dir, _ = raw
    s = prepare_split(raw_dir, tmp_path / "clean_test", "test", CFG, progress=False)
    slices = pd.read_parquet(tmp_path / "clean_test" / "slices.parquet")
    assert len(slices) == 5 and "fold" not in slices and "any" not in slices
    assert s.positives == {} and sum(s.rejected.values()) == 0


def test_a_cache_that_would_not_fit_stops_before_any_work(raw, tmp_path, monkeypatch):
    raw_dir, _ = raw
    real = shutil.disk_usage
    free = {"bytes": 10_000}  # the test split: 5 images x 32 x 32 x 3 = 15,360 bytes

    def fake(path):
        return real(path)._replace(free=free["bytes"])

    monkeypatch.setattr(cache.shutil, "disk_usage", fake)
    with pytest.raises(PrepareError, match=r"needs 0\.0 GB more .* only 0\.0 GB are free"):
        prepare_split(raw_dir, tmp_path / "clean", "test", CFG, progress=False)
    assert not (tmp_path / "clean" / cache.IMAGES).exists()
    free["bytes"] = 16_000
    assert prepare_split(raw_dir, tmp_path / "clean", "test", CFG, progress=False).n_files == 5
    assert cache.check_free_space(tmp_path / "clean", 5, 32, 3) == 0  # resumed: nothing more needed


def test_too_few_patients_for_the_folds_is_a_clear_error_and_keeps_the_work(raw, tmp_path):
    raw_dir, _ = raw
    many = PrepareConfig(image_size=32, n_folds=40, n_jobs=2, chunk_size=7)
    with pytest.raises(PrepareError, match="cannot make 40 patient-grouped folds from .* lower n_folds"):
        prepare_split(raw_dir, tmp_path / "clean", "train", many, progress=False)
    again = prepare_split(raw_dir, tmp_path / "clean", "train", CFG, progress=False)
    assert again.chunks_done_before > 0
    assert pd.read_parquet(tmp_path / "clean" / "slices.parquet")["fold"].nunique() == 3


def test_bad_label_csv_stops_before_any_work(raw, tmp_path):
    raw_dir, _ = raw
    csv = raw_dir / "stage_2_train.csv"
    lines = csv.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",0.7"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelsError, match="line 6"):
        prepare_split(raw_dir, tmp_path / "clean", "train", CFG, progress=False)
    assert not (tmp_path / "clean").exists()


def test_cli_errors_are_one_line(raw, tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    settings = dict(SETTINGS_TEMPLATE)
    del settings["LOGS_DIR"]
    (tmp_path / "s.json").write_text(json.dumps(settings))
    out = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--settings", str(tmp_path / "s.json")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "LOGS_DIR" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "s.json").write_text(json.dumps(SETTINGS_TEMPLATE))
    out = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--settings", str(tmp_path / "s.json"),
                          "--config", str(REPO / "configs/prepare/demo.yaml"), "--split", "test",
                          "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "test: 5 images in 1 series" in out.stdout


def test_nested_raw_folder_hint(raw, tmp_path):
    raw_dir, _ = raw
    nested = tmp_path / "outer"
    (nested / "rsna-intracranial-hemorrhage-detection").mkdir(parents=True)
    (raw_dir / "stage_2_test").rename(nested / "rsna-intracranial-hemorrhage-detection" / "stage_2_test")
    with pytest.raises(PrepareError, match="point RAW_DATA_DIR at .*rsna-intracranial-hemorrhage-detection"):
        prepare_split(nested, tmp_path / "clean", "test", CFG, progress=False)
