"""The study path (predict.py --study) is the batch path: same probabilities for the same slices."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, Poller, run_script
from ich.labels import LABELS
from ich.study import STUDY_REASONS, StudyError, choose_series, study_files, zip_members


def test_study_probabilities_equal_the_batch_path(prepared, study_models, tmp_path):
    settings, cfg, root = study_models
    test = pd.read_parquet(prepared / "clean" / "test" / "slices.parquet")
    counts = test["series_id"].value_counts()
    big, small = counts.index[0], counts.index[-1]
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w") as z:  # any layout: nested folders, other names, a stray file
        for i, image_id in enumerate(test.loc[test.series_id == big, "image_id"]):
            z.write(prepared / "raw" / "stage_2_test" / f"{image_id}.dcm", f"PATIENT/SER1/IM{i:04d}")
        for image_id in test.loc[test.series_id == small, "image_id"][:2]:
            z.write(prepared / "raw" / "stage_2_test" / f"{image_id}.dcm", f"PATIENT/SER2/{image_id}")
        z.writestr("PATIENT/README.txt", "not an image")
    before = set(Path(tempfile.gettempdir()).glob("ich_study_*"))
    scratch = tmp_path / "tmp"  # the CLI's temporary folder, watched: a zip is read in place, never extracted
    scratch.mkdir()
    with zipfile.ZipFile(zpath) as z:
        sizes = {i.file_size for i in z.infolist() if i.file_size > 1024}
    with FilesSeen([scratch, tmp_path / "o"]) as seen:
        out = subprocess.run([sys.executable, str(REPO / "predict.py"), "--no-progress", "--settings", str(settings),
                              "--config", str(cfg), "--study", str(zpath), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(f.startswith(str(tmp_path / "o")) for f in seen.files)  # the watcher sees what is written
    assert not [f for f, size in seen.files.items() if size in sizes], seen.files  # and no member came out
    assert "Research use only" in out.stdout and big not in out.stdout + out.stderr  # no UIDs in the log
    got = pd.read_csv(tmp_path / "o" / "study.csv", comment="#").set_index("image_id")
    want = pd.read_parquet(root / "models" / "stacking" / "study" / "test.parquet").set_index("image_id")
    ids = test.loc[test.series_id == big, "image_id"]
    assert set(got.index) == set(ids)
    np.testing.assert_allclose(got.loc[ids, list(LABELS)].to_numpy(), want.loc[ids, list(LABELS)].to_numpy(),
                               atol=1e-4, rtol=0)
    assert got["slice_number"].tolist() == list(range(1, len(got) + 1))  # 1-based, in z order, as the viewer
    assert (got["threshold"] == 0.5).all() and "instance_number" in got  # empty: generated files have none
    doc = json.loads((tmp_path / "o" / "study.json").read_text())
    reasons = {s["file"]: s["reason"] for s in doc["skipped"]}
    assert reasons["PATIENT/README.txt"] == "not_dicom"
    assert sum(r == "other_series" for r in reasons.values()) == 2 and set(reasons.values()) <= set(STUDY_REASONS)
    kaggle = pd.read_csv(tmp_path / "o" / "study_kaggle.csv", comment="#")
    assert len(kaggle) == 6 * len(ids) and kaggle["ID"].str.rsplit("_", n=1).str[1].isin(LABELS).all()
    after = set(Path(tempfile.gettempdir()).glob("ich_study_*"))
    assert after <= before  # nothing of the study is kept
    # the same files as a folder: the very same outputs (the zip's members are read as the files are)
    folder = tmp_path / "folder"
    with zipfile.ZipFile(zpath) as z:
        z.extractall(folder)
    out = run_script("predict.py", "--settings", settings, "--config", cfg, "--study", folder, "--out", tmp_path / "f")
    assert out.returncode == 0, out.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "f" / "study.csv", comment="#"),
                                  pd.read_csv(tmp_path / "o" / "study.csv", comment="#"))
    assert json.loads((tmp_path / "f" / "study.json").read_text())["skipped"] == doc["skipped"]


class FilesSeen(Poller):
    """Every regular file that appears under some folders while a run goes on, with the largest size it had
    (polled; a file that lives shorter than a poll can be missed, an extracted slice of a study does not)."""

    def __init__(self, roots, every: float = 0.02):
        super().__init__(every)
        self.roots, self.files = roots, {}

    def poll(self):
        for root in self.roots:
            for dirpath, _, names in os.walk(root):
                for name in names:
                    path = os.path.join(dirpath, name)
                    try:
                        size = os.lstat(path).st_size
                    except OSError:
                        continue
                    self.files[path] = max(size, self.files.get(path, 0))


def test_hostile_zips_are_refused_in_one_line(tmp_path):
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../../evil.dcm", b"x")
    with pytest.raises(StudyError, match="unsafe path"):
        zip_members(slip)
    assert not (tmp_path.parent / "evil.dcm").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big", b"\0" * (3 << 20))
    with pytest.raises(StudyError, match="unpacks to more than"):
        zip_members(bomb, max_bytes=1 << 20)
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(StudyError):
        study_files(tmp_path / "junk.zip", tmp_path / "w")
    with pytest.raises(StudyError, match="not found"):
        study_files(tmp_path / "nowhere", tmp_path / "w")


def test_no_axial_ct_series_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    files = choose_series(study_files(tmp_path, tmp_path / "w"))
    assert files.chosen == [] and files.skipped[0]["reason"] == "not_dicom"
