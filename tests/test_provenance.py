"""The reproducibility record of fold{k}.pt, oof.parquet and submission.csv (ich.provenance)."""
import hashlib
import json
import subprocess

import pandas as pd
import pytest
import torch

from conftest import run_script
from ich import provenance
from ich.labels import LABELS


def check_record(rec: dict, config: dict, cache_dir):
    assert rec["config_digest"] == provenance.config_digest(config)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=provenance.REPO).stdout.strip()
    assert rec["git"] in (head, "dirty") and rec["git_head"] == head
    assert rec["versions"]["torch"] == torch.__version__
    assert set(rec["versions"]) == {"torch", "timm", "pydicom", "lightgbm"} and all(rec["versions"].values())
    assert rec["device"].startswith(("cpu", "cuda"))
    assert rec["cache_files_digest"] == json.loads((cache_dir / "cache_meta.json").read_text())["files_digest"]


def test_checkpoints_and_oof_carry_the_record(prepared, trained):
    _, _, work = trained
    tiny = work / "models" / "tiny"
    clean = prepared / "clean" / "train"
    ckpt = torch.load(tiny / "fold0.pt", weights_only=True)
    from models.checkpoint import read_provenance
    check_record(read_provenance(tiny / "fold0.pt"), ckpt["config"], clean)
    with pytest.raises(ValueError, match="models.checkpoint.read_provenance"):
        provenance.read_provenance(tiny / "fold0.pt")  # the checkpoint format has one reader
    for name in ("oof.parquet", "oof_last.parquet"):
        rec = provenance.read_provenance(tiny / name)
        check_record(rec, ckpt["config"], clean)
        assert list(pd.read_parquet(tiny / name).columns) == ["image_id", *LABELS]  # the table reads as before


def test_submission_has_a_sidecar_record_and_predict_prints_it(study_models):
    settings, cfg, root = study_models
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    sub = root / "sub" / "submission.csv"
    side = root / "sub" / "submission.provenance.json"
    assert f"made by: git " in out.stdout and str(side) in out.stdout
    assert sub.read_text().startswith("ID,Label\n")  # the CSV itself is Kaggle's format, nothing added
    rec = json.loads(side.read_text())
    assert rec["sha256"] == hashlib.sha256(sub.read_bytes()).hexdigest() and rec["file"] == "submission.csv"
    assert rec["kind"] == "stage two" and rec["device"].startswith("cpu")
    test_dir = json.loads(settings.read_text())["TEST_DATA_CLEAN_PATH"]
    assert rec["cache_files_digest"] == json.loads(open(f"{test_dir}/cache_meta.json").read())["files_digest"]
    (trained_rec,) = rec["experiments"]["tiny"]  # one record for all fold models of one run
    assert trained_rec["cache_files_digest"] == rec["train_cache_files_digest"]
    assert provenance.read_provenance(sub) == rec


def test_experiments_trained_from_different_caches_are_an_error(tmp_path):
    from models.predict_split import InferenceError, training_records
    train = tmp_path / "train"
    train.mkdir()
    (train / "cache_meta.json").write_text(json.dumps({"files_digest": "a" * 40}))
    for exp, digest in (("one", "a" * 40), ("two", "b" * 40), ("old", None)):
        (tmp_path / "m" / exp).mkdir(parents=True)
        state = {"state_dict": {}, "config": {}}  # the keys of a fold checkpoint (models.checkpoint.FOLD_KEYS)
        if digest is not None:
            state["provenance"] = {"cache_files_digest": digest}
        torch.save(state, tmp_path / "m" / exp / "fold0.pt")
    assert training_records(tmp_path / "m", ["one", "old"], train) == {
        "one": [{"cache_files_digest": "a" * 40}], "old": []}  # a checkpoint without a record is not compared
    with pytest.raises(InferenceError, match="different caches.*one from a cache.*aaaa.*two from a cache.*bbbb"):
        training_records(tmp_path / "m", ["one", "two"], train)
    with pytest.raises(InferenceError, match="different caches"):
        training_records(tmp_path / "m", ["two"], train)  # not the train cache stage two reads


def test_git_state_commit_or_dirty(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    assert provenance.git_state(tmp_path) == ("unknown", "unknown")
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    state, head = provenance.git_state(tmp_path)
    assert state == head and len(head) == 40
    (tmp_path / "untracked.txt").write_text("data")
    assert provenance.git_state(tmp_path)[0] == head  # untracked files (data, caches) do not count
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path) == ("dirty", head)
