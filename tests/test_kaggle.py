"""The Kaggle route: kaggle/upload_checkpoints.py stages a checkpoint dataset, kaggle/kernel.py predicts offline.

One module fixture builds a fake /kaggle tree in a temporary folder: the
competition data (generated, nested one folder deep like the real one), a
checkpoint dataset made by training a tiny stage one and staging it with the
upload script (dry run), a wheels folder, and the repository as the code
dataset. The kernel runs against it with the pip step replaced by a recorder.
"""
import hashlib
import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, Poller
from conftest import TINY as BASE_TINY
from ich.config import PrepareConfig
from ich.prepare import prepare_split
from synthetic import generate_dataset

COMP = "rsna-intracranial-hemorrhage-detection"
EXP = "tiny_kaggle"
TINY = {**BASE_TINY, "train": {**BASE_TINY["train"], "epochs": 1}}  # conftest's, one epoch
PREDICT = {
    "experiments": [EXP], "k_neighbors": 2, "pca_components": 0,
    "lgb": {"num_leaves": 7, "min_data_in_leaf": 5}, "num_boost_round": 50, "early_stopping_rounds": 10,
    "batch_size": 32, "num_workers": 0,
}
# one OpenMP thread in the subprocesses: these networks are tiny, and on a busy 2-core machine two
# spinning OpenMP threads per process make torch 10-40x slower (measured: 3.3 s against 0.08 s a step)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAKE_PIP = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"
FAKE_KAGGLE = "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/kaggle_was_called\"\n"


def snapshot(root: Path) -> dict:
    """Every path under root -> (mode bits, size, mtime, content digest for files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return out


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A fake /kaggle tree with the competition, a trained tiny checkpoint dataset and a wheels folder."""
    root = tmp_path_factory.mktemp("kaggle")
    kin = root / "kaggle" / "input"
    raw = kin / COMP / COMP  # the real competition folder nests once
    generate_dataset(raw, n_train_patients=4, n_test_patients=2, image_size=64, seed=5, n_jobs=2, progress=False)

    # the user's machine: prepare train, train a tiny stage one
    local = root / "local"
    prepare_split(raw, local / "clean" / "train", "train", PrepareConfig(image_size=64, n_folds=3, n_jobs=2),
                  progress=False)
    settings = local / "SETTINGS.json"
    settings.write_text(json.dumps({
        "RAW_DATA_DIR": str(raw), "TRAIN_DATA_CLEAN_PATH": "clean/train", "TEST_DATA_CLEAN_PATH": "clean/test",
        "MODEL_CHECKPOINT_DIR": "models", "LOGS_DIR": "logs", "SUBMISSION_DIR": "submissions"}))
    (local / f"{EXP}.yaml").write_text(yaml.safe_dump(TINY))
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--no-progress", "--settings", str(settings),
                          "--config", str(local / f"{EXP}.yaml")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stderr[-3000:]
    predict_cfg = local / "kaggle_test.yaml"
    predict_cfg.write_text(yaml.safe_dump(PREDICT))

    # the upload script, dry run, with a fake `kaggle` on PATH that records any call
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(FAKE_KAGGLE)
    (bin_dir / "kaggle").chmod(0o755)
    ckpt = kin / "rsna-ich-checkpoints"
    upload = subprocess.run(
        [sys.executable, str(REPO / "kaggle" / "upload_checkpoints.py"), "--settings", str(settings),
         "--config", str(predict_cfg), "--out", str(ckpt), "--username", "testuser"],
        capture_output=True, text=True, cwd=local, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert upload.returncode == 0, upload.stdout + upload.stderr

    wheels = kin / "rsna-ich-wheels"
    wheels.mkdir()
    (wheels / "placeholder-0.0-py3-none-any.whl").write_bytes(b"")
    return {"root": root, "input": kin, "raw": raw, "local": local, "settings": settings, "ckpt": ckpt,
            "wheels": wheels, "upload": upload, "bin": bin_dir, "predict_cfg": predict_cfg}


def kernel_env(fake, tmp_path, **extra):
    working, scratch = tmp_path / "working", tmp_path / "tmp"
    pip_log = tmp_path / "pip_calls.jsonl"
    env = {**os.environ, **ONE_THREAD, "KAGGLE_INPUT": str(fake["input"]), "KAGGLE_WORKING": str(working),
           "ICH_SCRATCH": str(scratch), "ICH_CODE_DIR": str(REPO),
           "ICH_PIP": shlex.join([sys.executable, "-c", FAKE_PIP, str(pip_log)])}
    for k in ("ICH_CHECKPOINTS_DIR", "ICH_WHEELS_DIR", "ICH_PREDICT_CONFIG", "ICH_PREPARE_CONFIG", "ICH_TEST_CACHE",
              "ICH_COMPETITION_DIR", "ICH_MODELS_DIR", "ICH_TEST_CLEAN_DIR", "ICH_PREDICT_ARGS",
              "ICH_LINK_MODE", "ICH_PROGRESS"):
        env.pop(k, None)
    env.update(extra)
    return env, working, scratch, pip_log


def load_script(name):
    """kaggle/<name>.py as a module (kaggle/ is no package: the kernel is pushed as a lone file)."""
    spec = importlib.util.spec_from_file_location(f"ich_kaggle_{name}", REPO / "kaggle" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_kernel(env, cwd):
    return subprocess.run([sys.executable, str(REPO / "kaggle" / "kernel.py")], capture_output=True, text=True,
                          env=env, cwd=cwd)


class DiskWatch(Poller):
    """The bytes of regular files (links not followed) under a folder, polled while a run goes on: the peak,
    and every image cache file (ich.cache.IMAGES) that appeared at any moment."""

    def __init__(self, root: Path, every: float = 0.05):
        super().__init__(every)
        self.root, self.peak, self.caches = root, 0, set()

    def poll(self):
        from ich.cache import IMAGES
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if not path.is_symlink():
                    total += st.st_size
                if name == IMAGES:
                    self.caches.add(str(path))
        self.peak = max(self.peak, total)


def test_upload_script_stages_a_dry_run_folder(fake):
    ckpt, out = fake["ckpt"], fake["upload"].stdout
    assert "dry run: nothing uploaded" in out and f"kaggle datasets create -p {ckpt} --dir-mode zip" in out
    assert "kaggle datasets version" in out
    assert not (fake["bin"] / "kaggle_was_called").exists()
    meta = json.loads((ckpt / "dataset-metadata.json").read_text())
    assert meta["id"] == "testuser/rsna-ich-checkpoints" and meta["title"] and meta["licenses"]
    manifest = json.loads((ckpt / "ich_checkpoints.json").read_text())
    assert manifest["experiments"] == [EXP] and manifest["folds"] == [0, 1, 2]
    staged = sorted(p.name for p in (ckpt / "models" / EXP).iterdir())
    assert staged == sorted(["config.json", "oof.parquet", *(f"fold{k}{s}" for k in range(3)
                                                             for s in (".pt", ".oof.parquet"))])
    assert (ckpt / "train_clean" / "slices.parquet").is_file()
    # the staged configs mean what the originals meant
    from ich.config import load_prepare_config
    from stacking.config import load_predict_config
    assert load_predict_config(ckpt / "predict.yaml").name == "kaggle_test"
    assert load_predict_config(ckpt / "predict.yaml").experiments == [EXP]
    train_meta = json.loads((fake["local"] / "clean" / "train" / "cache_meta.json").read_text())
    key = load_prepare_config(ckpt / "prepare_test.yaml").cache_key()
    assert all(key[k] == train_meta[k] for k in key), (key, train_meta)


def test_upload_script_embeddings_and_errors(fake, tmp_path):
    up = load_script("upload_checkpoints")
    cfg = tmp_path / "pca.yaml"
    cfg.write_text(yaml.safe_dump({**PREDICT, "pca_components": 2}))
    manifest = up.stage(fake["settings"], cfg, tmp_path / "stage", dataset_id="u/x", log=lambda *a: None)
    assert f"models/{EXP}/oof_emb.npy" in manifest["files"]
    assert manifest["config_name"] == "pca"

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**PREDICT, "experiments": ["never_trained"]}))
    with pytest.raises(up.StageError, match="never_trained"):
        up.stage(fake["settings"], bad, tmp_path / "stage2", dataset_id="u/x", log=lambda *a: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(up.StageError, match="not a staging folder"):
        up.stage(fake["settings"], cfg, foreign, dataset_id="u/x", log=lambda *a: None)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(up.StageError, match="placeholder"):
        up.upload(tmp_path / "stage", "<your-username>/rsna-ich-checkpoints", "create", "m")


def test_kernel_metadata_is_complete():
    meta = json.loads((REPO / "kaggle" / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "kernel.py" and (REPO / "kaggle" / meta["code_file"]).is_file()
    assert meta["kernel_type"] == "script" and meta["language"] == "python"
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False and meta["is_private"] is True
    assert meta["competition_sources"] == [COMP]
    assert len(meta["dataset_sources"]) == 3 and all("<your-username>/" in d for d in meta["dataset_sources"])
    assert meta["title"].lower().replace(" ", "-") == meta["id"].split("/")[1]  # Kaggle: slug from title
    for name in ("checkpoints", "code", "wheels"):
        ds = json.loads((REPO / "kaggle" / "datasets" / name / "dataset-metadata.json").read_text())
        assert ds["id"] in meta["dataset_sources"]


def test_kernel_end_to_end_on_a_fake_kaggle_tree(fake, tmp_path):
    env, working, scratch, pip_log = kernel_env(fake, tmp_path)
    ckpt, raw = fake["ckpt"], fake["raw"]
    inputs = [ckpt, fake["input"] / COMP]
    for d in inputs:  # read-only like /kaggle/input (root ignores the mode: the snapshots are the real check)
        set_writable(d, False)
    try:
        before = [snapshot(d) for d in inputs]
        scratch.mkdir(parents=True, exist_ok=True)
        with DiskWatch(scratch) as disk:
            out = run_kernel(env, tmp_path)
        after = [snapshot(d) for d in inputs]
    finally:
        for d in inputs:
            set_writable(d, True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert after[0] == before[0], "the checkpoint dataset was modified"
    assert after[1] == before[1], "the competition data was modified"

    # pip: once, offline, from the wheels dataset, with the code's requirements-base.txt
    calls = [json.loads(line) for line in pip_log.read_text().splitlines()]
    assert calls == [["install", "--no-index", "--find-links", str(fake["wheels"]), "-r",
                      str(REPO / "requirements-base.txt")]]

    sub = pd.read_csv(working / "submission.csv")
    sample = pd.read_csv(raw / "stage_2_sample_submission.csv")
    assert sub["ID"].tolist() == sample["ID"].tolist()
    assert sub["Label"].between(0, 1, inclusive="neither").all() and np.isfinite(sub["Label"]).all()

    settings = json.loads((working / "SETTINGS.json").read_text())
    assert settings["RAW_DATA_DIR"] == str(raw) and settings["TRAIN_DATA_CLEAN_PATH"] == str(ckpt / "train_clean")
    models = Path(settings["MODEL_CHECKPOINT_DIR"])
    assert models == scratch / "models"
    assert (models / EXP / "fold0.pt").is_symlink() and (models / EXP / "test.parquet").is_file()
    assert (models / "stacking" / "kaggle_test" / "test.parquet").is_file()
    assert "predict: done" in out.stdout and "submission" in out.stdout

    # scratch disk for images: zero. The test DICOMs are streamed through the engine: no image cache ever
    # appears, the test clean dir holds only the slice table, and scratch as a whole stays small (the model
    # tree's per-fold-model test outputs, a few hundred KB here)
    assert "stage one streamed" in out.stdout and "prepare test" not in out.stdout
    assert disk.caches == set(), f"an image cache was written: {sorted(disk.caches)}"
    assert sorted(p.name for p in (scratch / "clean" / "test").rglob("*") if p.is_file()) == [
        "key.json", "rejected.csv", "slices.parquet"]
    assert 0 < disk.peak < 200 << 20, f"scratch peaked at {disk.peak:,} bytes"
    print(f"scratch peak {disk.peak:,} bytes")


def test_kernel_pip_step_runs_once(fake, tmp_path, monkeypatch, capsys):
    """The offline install is skipped when an identical one is marked done (a rerun in the same session)."""
    kernel = load_script("kernel")
    env, _, scratch, pip_log = kernel_env(fake, tmp_path)
    for key in ("KAGGLE_INPUT", "ICH_PIP"):
        monkeypatch.setenv(key, env[key])
    scratch.mkdir()
    for _ in range(2):
        kernel.install_wheels(REPO, fake["input"], scratch)
    assert len(pip_log.read_text().splitlines()) == 1 and "pip skipped" in capsys.readouterr().out
    monkeypatch.setenv("ICH_WHEELS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(kernel.KernelError, match="ICH_WHEELS_DIR"):
        kernel.install_wheels(REPO, fake["input"], tmp_path / "other")


def test_kernel_fails_loudly(fake, tmp_path):
    env, *_ = kernel_env(fake, tmp_path, KAGGLE_INPUT=str(tmp_path / "empty"), ICH_COMPETITION_DIR=str(fake["raw"]))
    (tmp_path / "empty").mkdir()
    out = run_kernel(env, tmp_path)
    assert out.returncode == 1 and "no checkpoints found" in out.stderr and "ICH_CHECKPOINTS_DIR" in out.stderr

    env, *_ = kernel_env(fake, tmp_path, KAGGLE_INPUT=str(tmp_path / "empty"))
    out = run_kernel(env, tmp_path)
    assert out.returncode == 1 and "competition data not found" in out.stderr

    env, *_ = kernel_env(fake, tmp_path, ICH_PIP=shlex.join([sys.executable, "-c", "import sys; sys.exit(3)"]))
    out = run_kernel(env, tmp_path)
    assert out.returncode == 1 and "step 'install wheels' failed with exit code 3" in out.stderr


def test_kernel_checks_the_submission_against_the_sample(tmp_path):
    kernel = load_script("kernel")
    sample = tmp_path / "sample.csv"
    sample.write_text("ID,Label\nID_a_any,0.5\nID_b_any,0.5\n")
    good = tmp_path / "good.csv"
    good.write_text("ID,Label\nID_a_any,1e-06\nID_b_any,0.3\n")
    assert kernel.check_submission(good, sample) == 2
    for text, message in [("ID,Label\nID_b_any,0.1\nID_a_any,0.3\n", "ID ID_b_any where"),
                          ("ID,Label\nID_a_any,0.1\n", "differ in length"),
                          ("ID,Label\nID_a_any,1.5\nID_b_any,0.3\n", "outside"),
                          ("id,p\nID_a_any,0.1\nID_b_any,0.3\n", "header")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(kernel.KernelError, match=message):
            kernel.check_submission(bad, sample)


def test_kernel_takes_the_competition_zip_as_downloaded(tmp_path, monkeypatch):
    """An input holding the competition's .zip: RAW_DATA_DIR is the zip itself (predict.py reads its members in
    place) and the submission is checked against the sample inside it."""
    import zipfile
    kernel = load_script("kernel")
    base = tmp_path / "input" / COMP
    base.mkdir(parents=True)
    with zipfile.ZipFile(base / f"{COMP}.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{COMP}/stage_2_sample_submission.csv", "ID,Label\nID_a_any,0.5\nID_b_any,0.5\n")
        z.writestr(f"{COMP}/stage_2_test/ID_a.dcm", b"x")
    monkeypatch.delenv("ICH_COMPETITION_DIR", raising=False)
    raw = kernel.competition_dir(tmp_path / "input")
    assert raw == base / f"{COMP}.zip"
    good = tmp_path / "good.csv"
    good.write_text("ID,Label\nID_a_any,0.1\nID_b_any,0.3\n")
    assert kernel.check_submission(good, raw) == 2
    good.write_text("ID,Label\nID_b_any,0.1\nID_a_any,0.3\n")
    with pytest.raises(kernel.KernelError, match="ID ID_b_any where"):
        kernel.check_submission(good, raw)


def test_one_fold_trains_from_the_read_only_input_with_no_image_written(fake, tmp_path):
    """Stage one in a kernel's shape: the competition input read-only, prepare_data without images, then
    train.py with input.source: dicom for one fold. No image file appears anywhere under the working
    folder (DiskWatch, as for the streamed test split) and the input is left as it was."""
    working = tmp_path / "working"
    working.mkdir()
    (working / "SETTINGS.json").write_text(json.dumps({
        "RAW_DATA_DIR": str(fake["raw"]), "TRAIN_DATA_CLEAN_PATH": "clean/train", "TEST_DATA_CLEAN_PATH": "clean/test",
        "MODEL_CHECKPOINT_DIR": "models", "LOGS_DIR": "logs", "SUBMISSION_DIR": "submissions"}))
    (working / "prep.yaml").write_text(yaml.safe_dump({"image_size": 64, "n_folds": 3, "n_jobs": 1,
                                                       "images": False}))
    (working / "dicom.yaml").write_text(yaml.safe_dump({**TINY, "input": {**TINY["input"], "source": "dicom"}}))
    env = {**os.environ, **ONE_THREAD, "TMPDIR": str(working / "tmp")}
    (working / "tmp").mkdir()
    set_writable(fake["input"] / COMP, False)
    try:
        before = snapshot(fake["input"] / COMP)
        with DiskWatch(working) as disk:
            runs = [subprocess.run([sys.executable, str(REPO / script), "--no-progress", "--settings",
                                    str(working / "SETTINGS.json"), *extra], capture_output=True, text=True,
                                   cwd=working, env=env)
                    for script, extra in (("prepare_data.py", ["--split", "train", "--config", "prep.yaml"]),
                                          ("train.py", ["--config", "dicom.yaml", "--folds", "0"]))]
        after = snapshot(fake["input"] / COMP)
    finally:
        set_writable(fake["input"] / COMP, True)
    for out in runs:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert after == before, "the competition data was modified"
    assert disk.caches == set(), f"an image cache was written: {sorted(disk.caches)}"
    assert (working / "models" / "dicom" / "fold0.pt").is_file() and "fold 0: out-of-fold" in runs[1].stdout
    clean = sorted(p.relative_to(working / "clean" / "train").as_posix()
                   for p in (working / "clean" / "train").rglob("*") if p.is_file())
    assert [p for p in clean if not p.startswith("parts/")] == ["cache_meta.json", "rejected.csv", "slices.parquet"]
    npy = [p.name for p in working.rglob("*.npy")]
    assert npy == ["fold0.oof_emb.npy"], npy  # embeddings (float16, 512-d), never an image
