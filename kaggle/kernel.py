#!/usr/bin/env python
"""Kaggle kernel (offline): predict the RSNA ICH test set with trained checkpoints -> submission.csv.

Pushed with `kaggle kernels push -p kaggle/` (kaggle/kernel-metadata.json).
Everything comes from attached inputs, the internet is off:

- the competition data  /kaggle/input/rsna-intracranial-hemorrhage-detection
  (the files may sit one folder deeper, in rsna-intracranial-hemorrhage-detection/);
- the code dataset      the repository (a folder with predict.py and ich/);
- the wheels dataset    wheels of requirements-base.txt (Kaggle's own torch is kept);
- the checkpoints       made by kaggle/upload_checkpoints.py (ich_checkpoints.json at its top).

Steps, each one loud on failure (message + non-zero exit):
1. pip install --no-index --find-links WHEELS -r CODE/requirements-base.txt
   (skipped when the marker of an identical earlier install is there);
2. a writable model tree: the checkpoint dataset is read-only, but predict.py
   writes the stage-one test outputs (test_fold{k}.parquet, ...) and the
   stage-two outputs under MODEL_CHECKPOINT_DIR. So MODEL_CHECKPOINT_DIR is a
   fresh folder in which every checkpoint file is a symlink into the dataset
   (nothing copied; the writers replace files atomically, so a link is never
   written through);
3. SETTINGS.json in the working folder, then predict.py runs as a subprocess
   with this Python. TEST_DATA_CLEAN_PATH holds no test cache, so predict.py
   streams the test DICOMs through the in-memory engine (pipeline.batch):
   no image is written, where a 512-px test cache took about 95 GB
   (ICH_TEST_CACHE=1 builds one first with prepare_data.py --split test, the
   old road, for a kernel with the disk);
4. SUBMISSION_DIR/submission.csv is checked against the sample submission and
   copied to /kaggle/working/submission.csv, which Kaggle picks up.

The model tree (links, plus predict.py's per-fold-model test outputs: the README's
"Predicting in an offline Kaggle kernel" gives the disk they take) and the streamed slice table go
to a scratch folder outside /kaggle/working (ICH_SCRATCH, default
/kaggle/tmp): /kaggle/working is saved as the kernel's output and is limited in
size, so only SETTINGS.json, logs, submissions and submission.csv go there.

Every path can be overridden by an environment variable (that is how
tests/test_kaggle.py runs this against a fake /kaggle tree):

  KAGGLE_INPUT        /kaggle/input
  KAGGLE_WORKING      /kaggle/working
  ICH_SCRATCH         /kaggle/tmp
  ICH_COMPETITION_DIR $KAGGLE_INPUT/rsna-intracranial-hemorrhage-detection (its folder, or the
                      competition .zip as downloaded: read in place, nothing extracted)
  ICH_CODE_DIR        found under $KAGGLE_INPUT (a folder with predict.py and ich/)
  ICH_WHEELS_DIR      found under $KAGGLE_INPUT (a folder with *.whl)
  ICH_CHECKPOINTS_DIR found under $KAGGLE_INPUT (a folder with ich_checkpoints.json)
  ICH_PREDICT_CONFIG  the checkpoints' predict.yaml, else CODE/configs/predict/default.yaml
  ICH_TEST_CACHE      1: prepare a test image cache first (default: stream, no image on disk)
  ICH_PREPARE_CONFIG  with ICH_TEST_CACHE=1: the checkpoints' prepare_test.yaml, else CODE/configs/prepare/default.yaml
  ICH_PREDICT_ARGS    extra predict.py arguments, e.g. "--stage1-only"
  ICH_PIP             the pip command (default: "<this python> -m pip"); "skip" skips the install
  ICH_MODELS_DIR      writable model tree (default $ICH_SCRATCH/models)
  ICH_LINK_MODE       symlink (default) or copy: how the model tree refers to the checkpoints
  ICH_TEST_CLEAN_DIR  test clean dir: the streamed slice table (default $ICH_SCRATCH/clean/test)
  ICH_PROGRESS        1: progress bars in the entry points (default: off, the log stays short)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

COMPETITION = "rsna-intracranial-hemorrhage-detection"
MANIFEST = "ich_checkpoints.json"
SAMPLE = "stage_2_sample_submission.csv"
T0 = time.time()


class KernelError(RuntimeError):
    """A missing input or a failed step: printed as one clear line, exit status 1."""


def log(msg: str) -> None:
    print(f"[kernel {time.time() - T0:6.0f}s] {msg}", flush=True)


def env_path(name: str, default: Path | str | None) -> Path | None:
    value = os.environ.get(name)
    if value:
        return Path(value).expanduser()
    return None if default is None else Path(default)


def _candidates(root: Path, depth: int = 3):
    """Folders under root down to `depth` levels, shallow first; never lists a folder with many entries."""
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    for i, e in enumerate(it):
                        if i > 200:  # an image folder (stage_2_test/ ...): not where datasets live
                            break
                        if e.is_dir() and not e.name.startswith("."):
                            nxt.append(Path(e.path))
            except OSError:
                continue
        nxt.sort()
        yield from nxt
        level = nxt


def find_dir(what: str, var: str, root: Path, test, hint: str) -> Path:
    """The folder named by env var `var`, else the first folder under root that passes `test`."""
    given = env_path(var, None)
    if given is not None:
        if not test(given):
            raise KernelError(f"{var}={given} is not a valid {what} folder ({hint})")
        return given
    if test(root):
        return root
    for d in _candidates(root):
        if test(d):
            return d
    raise KernelError(f"no {what} found under {root} ({hint}); attach that dataset to the kernel "
                      f"or set {var}")


def is_code(d: Path) -> bool:
    return (d / "predict.py").is_file() and (d / "prepare_data.py").is_file() and (d / "ich" / "__init__.py").is_file()


def is_wheels(d: Path) -> bool:
    try:
        with os.scandir(d) as it:
            for i, e in enumerate(it):
                if e.name.endswith(".whl"):
                    return True
                if i > 1000:  # not a wheel folder (an image folder): stop listing it
                    return False
    except OSError:
        pass
    return False


def is_checkpoints(d: Path) -> bool:
    return (d / MANIFEST).is_file()


def sample_member(archive: Path) -> str | None:
    """The sample submission's member name in the competition zip (the shallowest), or None."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == SAMPLE or n.endswith("/" + SAMPLE)]
    except (zipfile.BadZipFile, OSError):
        return None
    return min(names, key=len, default=None)


def competition_dir(kaggle_input: Path) -> Path:
    """RAW_DATA_DIR: the folder holding stage_2_test/ and the sample submission (possibly nested once), or
    the competition .zip as downloaded (predict.py reads its members in place, nothing is extracted)."""
    base = env_path("ICH_COMPETITION_DIR", kaggle_input / COMPETITION)
    for d in (base, base / COMPETITION):
        if (d / SAMPLE).is_file() and (d / "stage_2_test").is_dir():
            return d
    for z in (base, base / f"{COMPETITION}.zip"):
        if z.is_file() and sample_member(z):
            return z
    seen = sorted(p.name for p in base.iterdir())[:20] if base.is_dir() else "missing"
    raise KernelError(f"competition data not found: no {SAMPLE} + stage_2_test/ in {base} or "
                      f"{base / COMPETITION} (it holds: {seen}); add the competition to the kernel's inputs "
                      "or set ICH_COMPETITION_DIR")


def run_step(name: str, cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    log(f"{name}: $ {shlex.join(cmd)}")
    t = time.time()
    try:
        code = subprocess.run(cmd, cwd=cwd, env=env).returncode
    except OSError as exc:
        raise KernelError(f"step '{name}' could not start: {exc}") from exc
    if code != 0:
        raise KernelError(f"step '{name}' failed with exit code {code} (command above; its output just before)")
    log(f"{name}: done in {time.time() - t:.0f} s")


def install_wheels(code: Path, kaggle_input: Path, scratch: Path) -> None:
    pip = os.environ.get("ICH_PIP", f"{shlex.quote(sys.executable)} -m pip")
    if pip.strip().lower() == "skip":
        log("pip install skipped (ICH_PIP=skip)")
        return
    req = code / "requirements-base.txt"
    if not req.is_file():
        raise KernelError(f"{req} not found: the code dataset is incomplete")
    wheels = find_dir("wheels", "ICH_WHEELS_DIR", kaggle_input, is_wheels, "a folder of *.whl files")
    digest = hashlib.sha1(req.read_bytes() + str(wheels).encode()).hexdigest()[:16]
    marker = scratch / f".ich_wheels_installed_{digest}"
    if marker.is_file():
        log(f"wheels already installed ({marker}); pip skipped")
        return
    cmd = [*shlex.split(pip), "install", "--no-index", "--find-links", str(wheels), "-r", str(req)]
    run_step("install wheels", cmd, cwd=scratch)
    marker.write_text(shlex.join(cmd) + "\n")


def writable_models(ckpt: Path, manifest: dict, dest: Path) -> Path:
    """dest/<exp>/<file> -> symlinks into the read-only dataset; predict.py writes beside them."""
    src_root = ckpt / manifest.get("models_dir", "models")
    mode = os.environ.get("ICH_LINK_MODE", "symlink")
    n = 0
    for exp in manifest["experiments"]:
        if not (src_root / exp).is_dir():
            raise KernelError(f"checkpoint dataset {ckpt} has no {manifest.get('models_dir', 'models')}/{exp}/ "
                              f"for experiment {exp}: restage it with kaggle/upload_checkpoints.py")
    for src in sorted(d for d in src_root.iterdir() if d.is_dir()):  # every experiment staged, listed or not
        out = dest / src.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if not f.is_file():
                continue
            target = out / f.name
            if target.is_symlink() or (target.exists() and mode == "copy"):
                target.unlink()
            elif target.exists():
                continue  # a real file left by an earlier run in this session (e.g. test.parquet): predict decides
            if mode == "copy":
                shutil.copy2(f, target)
            else:
                target.symlink_to(f.resolve())
            n += 1
    log(f"model tree {dest}: {n} files {'copied' if mode == 'copy' else 'linked'} from {src_root}")
    return dest


def check_submission(path: Path, sample: Path) -> int:
    """Same IDs in the same order as the sample (a csv, or the competition zip holding it), probabilities in
    [0, 1]; returns the row count."""
    if not hasattr(sample, "read") and sample.is_file() and zipfile.is_zipfile(sample):
        with zipfile.ZipFile(sample) as z, z.open(sample_member(sample)) as member:
            return check_submission(path, member)
    with open(path) as a, (io.TextIOWrapper(sample) if hasattr(sample, "read") else open(sample)) as b:
        head_a = a.readline().strip()
        b.readline()
        if head_a.split(",")[:2] != ["ID", "Label"]:
            raise KernelError(f"{path}: header {head_a!r}, expected ID,Label")
        n = 0
        for n, (la, lb) in enumerate(zip(a, b), 1):
            ida, _, p = la.strip().partition(",")
            if ida != lb.split(",", 1)[0].strip():
                raise KernelError(f"{path} row {n}: ID {ida} where the sample has {lb.split(',', 1)[0]}")
            if not 0.0 <= float(p) <= 1.0:
                raise KernelError(f"{path} row {n}: probability {p} outside [0, 1]")
        if a.readline() or b.readline():
            raise KernelError(f"{path} and {sample} differ in length")
    return n


def main() -> int:
    kaggle_input = env_path("KAGGLE_INPUT", "/kaggle/input")
    working = env_path("KAGGLE_WORKING", "/kaggle/working")
    scratch = env_path("ICH_SCRATCH", "/kaggle/tmp")
    for d in (working, scratch):
        d.mkdir(parents=True, exist_ok=True)
    final = working / "submission.csv"
    final.unlink(missing_ok=True)  # a failed run must not leave an older submission behind

    raw = competition_dir(kaggle_input)
    code = find_dir("code", "ICH_CODE_DIR", kaggle_input, is_code, "predict.py, prepare_data.py and ich/")
    ckpt = find_dir("checkpoints", "ICH_CHECKPOINTS_DIR", kaggle_input, is_checkpoints,
                    f"{MANIFEST} at its top, made by kaggle/upload_checkpoints.py")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        manifest["experiments"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KernelError(f"{ckpt / MANIFEST} is not a manifest of kaggle/upload_checkpoints.py: {exc!r}") from exc
    log(f"competition data {raw}\n  code {code}\n  checkpoints {ckpt} "
        f"(experiments {', '.join(manifest['experiments'])}, staged {manifest.get('created', '?')})")

    install_wheels(code, kaggle_input, scratch)

    train_clean = ckpt / manifest.get("train_clean_dir", "train_clean")
    if not (train_clean / "slices.parquet").is_file():
        raise KernelError(f"{train_clean / 'slices.parquet'} not found in the checkpoint dataset "
                          "(stage two trains on it): restage with kaggle/upload_checkpoints.py")
    models = writable_models(ckpt, manifest, env_path("ICH_MODELS_DIR", scratch / "models"))
    test_clean = env_path("ICH_TEST_CLEAN_DIR", scratch / "clean" / "test")

    def from_ckpt(key: str, fallback: Path) -> Path:
        rel = manifest.get(key)
        return ckpt / rel if rel and (ckpt / rel).is_file() else fallback

    predict_cfg = env_path("ICH_PREDICT_CONFIG", from_ckpt("predict_config", code / "configs/predict/default.yaml"))
    use_cache = os.environ.get("ICH_TEST_CACHE") == "1"
    prepare_cfg = env_path("ICH_PREPARE_CONFIG", from_ckpt("prepare_config", code / "configs/prepare/default.yaml"))
    for name, p in (("predict config", predict_cfg), *((("prepare config", prepare_cfg),) if use_cache else ())):
        if not p.is_file():
            raise KernelError(f"{name} {p} not found")

    settings = {
        "RAW_DATA_DIR": str(raw),
        "TRAIN_DATA_CLEAN_PATH": str(train_clean),  # read only: predict.py reads slices.parquet
        "TEST_DATA_CLEAN_PATH": str(test_clean),
        "MODEL_CHECKPOINT_DIR": str(models),
        "LOGS_DIR": str(working / "logs"),
        "SUBMISSION_DIR": str(working / "submissions"),
    }
    settings_path = working / "SETTINGS.json"
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    log(f"settings {settings_path}: " + json.dumps(settings, indent=1))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    quiet = [] if os.environ.get("ICH_PROGRESS") == "1" else ["--no-progress"]
    py = sys.executable
    if use_cache:
        run_step("prepare test", [py, str(code / "prepare_data.py"), "--settings", str(settings_path),
                                  "--config", str(prepare_cfg), "--split", "test", *quiet], cwd=working, env=env)
    extra = shlex.split(os.environ.get("ICH_PREDICT_ARGS", ""))
    run_step("predict", [py, str(code / "predict.py"), "--settings", str(settings_path),
                         "--config", str(predict_cfg), *quiet, *extra], cwd=working, env=env)

    produced = working / "submissions" / ("submission_stage1.csv" if "--stage1-only" in extra else "submission.csv")
    if not produced.is_file():
        raise KernelError(f"predict.py finished but {produced} is not there")
    rows = check_submission(produced, raw if raw.is_file() else raw / SAMPLE)
    if produced.resolve() != final.resolve():
        tmp = final.with_name(".submission.csv.tmp")
        shutil.copyfile(produced, tmp)
        os.replace(tmp, final)
    log(f"submission {final}: {rows} rows, IDs as in {SAMPLE}. Done in {time.time() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KernelError as exc:
        print(f"kernel: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
