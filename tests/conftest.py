"""Shared fixtures: the real competition slice, and small hand-made DICOM sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich.labels import LABELS, to_long
from synthetic.dicom_writer import write_ct_slice

REPO = Path(__file__).resolve().parents[1]
REAL_SLICE = Path(os.environ.get("ICH_REAL_SLICE", REPO.parent / "shared" / "data" / "ID_0000ca2f6.dcm"))


@pytest.fixture
def real_slice() -> Path:
    if not REAL_SLICE.is_file():
        pytest.skip(f"real competition slice not found at {REAL_SLICE} (set ICH_REAL_SLICE)")
    return REAL_SLICE


def phantom(size: int = 64, seed: int = 0, lesion: bool = False) -> np.ndarray:
    """A small disc 'head' in HU: air, skull ring, brain, optional bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < 0.85] = 1000.0
    hu[r < 0.75] = 35.0
    if lesion:
        hu[np.hypot(yy - size * 0.4, xx - size * 0.6) < size * 0.1] = 75.0
    return hu + rng.normal(0, 3, hu.shape) * (r < 0.75)


def write_series(folder: Path, *, series: str, patient: str, study: str | None = None, n: int = 6,
                 spacing: float = 5.0, size: int = 64, tilt: bool = False, descending: bool = False,
                 first_id: int = 0, **kwargs) -> list[str]:
    """n slices of one series, written in scrambled file-name order; returns image ids by true z order."""
    folder.mkdir(parents=True, exist_ok=True)
    orientation = (1.0, 0.0, 0.0, 0.0, 0.920505, -0.390731) if tilt else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    o = np.array(orientation)
    normal = np.cross(o[:3], o[3:])
    ids = []
    rng = np.random.default_rng(first_id)
    hexes = rng.permutation(n)  # file names unrelated to order
    for k in range(n):
        step = -k if descending else k
        pos = np.array([-125.0, -112.0, 0.0]) + normal * step * spacing
        image_id = f"ID_{series[-3:]}{hexes[k]:03d}{first_id:02d}"
        write_ct_slice(folder / f"{image_id}.dcm", phantom(size, seed=k), sop_uid=image_id, patient_id=patient,
                       study_uid=study or f"ID_st{series}", series_uid=series, position=tuple(pos),
                       orientation=orientation, **kwargs)
        ids.append(image_id)
    return ids[::-1] if descending else ids


def write_labels(path: Path, image_ids, seed: int = 0, positive_rate: float = 0.3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    wide = pd.DataFrame((rng.random((len(image_ids), 5)) < positive_rate).astype(np.int8),
                        index=pd.Index(image_ids, name="image_id"), columns=list(LABELS[:5]))
    wide["any"] = wide.max(axis=1)
    to_long(wide).to_csv(path, index=False)
    return wide


SETTINGS_TEMPLATE = {
    "RAW_DATA_DIR": "raw",
    "TRAIN_DATA_CLEAN_PATH": "clean/train",
    "TEST_DATA_CLEAN_PATH": "clean/test",
    "MODEL_CHECKPOINT_DIR": "models",
    "LOGS_DIR": "logs",
    "SUBMISSION_DIR": "submissions",
}


# --- a tiny trained pipeline shared by the stage-one, stage-two and predict tests -----------

TINY = {
    "model": {"backbone": "test_resnet"},
    "input": {"mode": "windows", "size": 64},
    "augment": {"hflip": 0.5, "shift_scale_rotate": 0.0},
    "optim": {"lr": 0.001, "schedule": "cosine"},
    "train": {"epochs": 8, "batch_size": 16, "num_workers": 0, "amp": "none"},
}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small generated dataset, prepared once for the session (3 folds, 64 px, train and test)."""
    from ich.config import PrepareConfig
    from ich.prepare import prepare_split
    from synthetic import generate_dataset
    root = tmp_path_factory.mktemp("pipeline")
    generate_dataset(root / "raw", n_train_patients=14, n_test_patients=3, image_size=64, seed=3,
                     n_jobs=2, progress=False)
    cfg = PrepareConfig(image_size=64, n_folds=3, n_jobs=2)
    prepare_split(root / "raw", root / "clean" / "train", "train", cfg, progress=False)
    prepare_split(root / "raw", root / "clean" / "test", "test", cfg, progress=False)
    return root


def settings_for(root: Path, tmp_path: Path) -> Path:
    s = {"RAW_DATA_DIR": str(root / "raw"), "TRAIN_DATA_CLEAN_PATH": str(root / "clean" / "train"),
         "TEST_DATA_CLEAN_PATH": str(root / "clean" / "test"), "MODEL_CHECKPOINT_DIR": str(tmp_path / "models"),
         "LOGS_DIR": str(tmp_path / "logs"), "SUBMISSION_DIR": str(tmp_path / "sub")}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(s))
    return path


def write_config(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    import yaml
    cfg = json.loads(json.dumps(TINY))
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_script(script: str, *args):
    return subprocess.run([sys.executable, str(REPO / script), "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def run_train(*args):
    return run_script("train.py", *args)


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """train.py run once with the tiny config: (settings path, completed process, work dir)."""
    work = tmp_path_factory.mktemp("trained")
    settings = settings_for(prepared, work)
    out = run_train("--settings", settings, "--config", write_config(work))
    assert out.returncode == 0, out.stderr[-3000:]
    return settings, out, work


def link_models(src: Path, dst: Path) -> Path:
    """A copy of an experiment folder made of links (checkpoints, OOF files), without its test outputs."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.startswith("test"):
            (dst / path.name).symlink_to(path)
    return dst


def write_paths(path: Path, *, raw: Path, train: Path, test: Path, root: Path) -> Path:
    """A settings file: raw data and clean dirs as given, models/logs/submissions under root."""
    path.write_text(json.dumps({
        "RAW_DATA_DIR": str(raw), "TRAIN_DATA_CLEAN_PATH": str(train), "TEST_DATA_CLEAN_PATH": str(test),
        "MODEL_CHECKPOINT_DIR": str(root / "models"), "LOGS_DIR": str(root / "logs"),
        "SUBMISSION_DIR": str(root / "sub")}))
    return path


def write_predict_config(path: Path, **overrides) -> Path:
    """A small, fast predict config over the tiny experiment, both stage-two members on (as the shipped
    configs), so that the study path and the web app are tested with the blend."""
    import yaml
    cfg = {"experiments": ["tiny"], "k_neighbors": 2, "pca_components": 2,
           "lgb": {"num_leaves": 7, "min_data_in_leaf": 10, "num_threads": 1},
           "num_boost_round": 60, "early_stopping_rounds": 10, "num_workers": 0,
           "members": ["lightgbm", "sequence"],
           "sequence": {"hidden": 8, "epochs": 6, "patience": 2, "batch_size": 4, "num_threads": 1, "device": "cpu"},
           **overrides}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def study_models(prepared, trained, tmp_path_factory):
    """predict.py on the generated test split with its own model tree: (settings, predict config, root).

    The trained tiny experiment plus a saved stage two: what `predict.py
    --study` and serve.py need (tests/test_study.py, tests/test_web*.py).
    """
    _, _, work = trained
    root = tmp_path_factory.mktemp("study_models")
    link_models(work / "models" / "tiny", root / "models" / "tiny")
    settings = write_paths(root / "settings.json", raw=prepared / "raw", train=prepared / "clean" / "train",
                           test=prepared / "clean" / "test", root=root)
    cfg = write_predict_config(root / "study.yaml")
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    return settings, cfg, root


def study_zip(prepared: Path, path: Path, *, n_other: int = 2, extra: dict | None = None) -> tuple[Path, list]:
    """A zip of one generated test study in a PACS-like layout: the largest test series (nested folders,
    other names), n_other slices of another series, a stray text file and `extra` {name: bytes}.
    Returns (zip path, image ids of the large series in slice order)."""
    import zipfile
    test = pd.read_parquet(prepared / "clean" / "test" / "slices.parquet").sort_values("slice_index")
    counts = test["series_id"].value_counts()
    big, small = counts.index[0], counts.index[-1]
    ids = test.loc[test.series_id == big, "image_id"].tolist()
    with zipfile.ZipFile(path, "w") as z:
        for i, image_id in enumerate(ids):
            z.write(prepared / "raw" / "stage_2_test" / f"{image_id}.dcm", f"PATIENT/SER1/IM{i:04d}")
        for image_id in test.loc[test.series_id == small, "image_id"][:n_other]:
            z.write(prepared / "raw" / "stage_2_test" / f"{image_id}.dcm", f"PATIENT/SER2/{image_id}")
        z.writestr("PATIENT/README.txt", "not an image")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path, ids


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(study_models, tmp_path_factory):
    """serve.py as a user starts it, on a free port of 127.0.0.1: (base URL, its Popen, its log file)."""
    import time
    import urllib.request
    settings, cfg, _ = study_models
    port = free_port()
    log = tmp_path_factory.mktemp("served") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--settings", str(settings), "--config",
                                 str(cfg), "--port", str(port), "--max-upload-mb", "64"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"serve.py did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield url, proc, log
    from hostile import stop
    stop(proc)


# --- DICOM SR validity: dcmtk's dsrdump and dicom3tools' dciodvfy (scripts/install_dicom_tools.sh) ------
SR_TOOLS = ("dsrdump", "dciodvfy")
# dciodvfy knows only registered coding schemes; the SR declares its private one (99RSNAICH) in the
# Coding Scheme Identification Sequence, which dciodvfy does not read. CT_small's zero weight is its own;
# anonymised sources (RSNA's) have empty Study Date / Study ID, which only a DICOMDIR would need.
SR_TOLERATED = ("Unrecognized defined term <99RSNAICH>", "Value is zero for value 1 of attribute <Patient's Weight>",
                "that would be needed to build DICOMDIR")


def sr_tools_missing() -> list[str]:
    import shutil
    return [t for t in SR_TOOLS if shutil.which(t) is None]


def sr_problems(data: bytes) -> list[str]:
    """What dsrdump (errors, warnings) and dciodvfy (errors, warnings beyond SR_TOLERATED) say of an SR file;
    [] when it is valid or when the tools are missing (test_sr.py has a test that skips then, with a message)."""
    import tempfile
    if sr_tools_missing():
        return []
    with tempfile.TemporaryDirectory(prefix="ich_srcheck_") as tmp:
        path = Path(tmp) / "sr.dcm"
        path.write_bytes(data)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        vfy = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = [f"dsrdump: {line}" for line in dump.stderr.splitlines() if line.strip()]
    if dump.returncode:
        out.append(f"dsrdump: exit status {dump.returncode}")
    out += [f"dciodvfy: {line}" for line in (vfy.stdout + vfy.stderr).splitlines()
            if line.startswith(("Error", "Warning")) and not any(t in line for t in SR_TOLERATED)]
    return out


def dies_in_epoch(monkeypatch, n: int):
    """models.trainer.run_epoch raises KeyboardInterrupt at its n-th call (a run killed mid-training);
    returns the real run_epoch, to put back with monkeypatch.setattr."""
    from models import trainer
    real, calls = trainer.run_epoch, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "run_epoch", dying)
    return real


class Poller:
    """A background thread that calls `poll()` every `every` seconds while a `with` block runs (the tests'
    disk and file watchers), and once more is not guaranteed: a file living shorter than a poll can be missed."""

    def __init__(self, every: float):
        import threading
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self):
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
