"""Bad input and faults: never a traceback, never lost work, memory bounded by design.

Each test reproduces a failure a probe found (pydicom's test corpus, kill -9,
crafted headers) on the code before the fix.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from conftest import REPO, phantom, write_labels, write_series
from ich import cache
from ich.config import PrepareConfig
from ich.dicom import REASONS, Rejected, read_stored
from ich.prepare import PrepareError, prepare_split
from synthetic.dicom_writer import write_ct_slice

CFG = PrepareConfig(image_size=32, n_folds=2, n_jobs=2, chunk_size=4)


def ct(path, sop_uid=None, size=32, **kw):
    """One small CT slice; the UID is the file name (Kaggle's convention) unless told otherwise."""
    uid = sop_uid or Path(path).name.removesuffix(".dcm")
    ids = dict(patient_id="ID_p1", study_uid="ID_st1", series_uid="ID_se1")
    write_ct_slice(path, phantom(size), sop_uid=uid, **{**ids, **kw})
    return Path(path)


def edit(path, fn):
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)
    return Path(path)


def settings(tmp_path) -> Path:
    s = {"RAW_DATA_DIR": "raw", "TRAIN_DATA_CLEAN_PATH": "clean/train", "TEST_DATA_CLEAN_PATH": "clean/test",
         "MODEL_CHECKPOINT_DIR": "models", "LOGS_DIR": "logs", "SUBMISSION_DIR": "sub"}
    (tmp_path / "settings.json").write_text(json.dumps(s))
    return tmp_path / "settings.json"


def run_prepare(tmp_path, *args, config=None):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(config or "image_size: 32\nn_folds: 2\nn_jobs: 2\nchunk_size: 4\n")
    return subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), "--settings", str(settings(tmp_path)),
                             "--config", str(cfg), "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


# --- A: the file name and the SOPInstanceUID disagree ---------------------------------------

def test_file_name_that_differs_from_the_uid_is_the_image_id_and_is_reported(tmp_path):
    test = tmp_path / "raw" / "stage_2_test"
    ids = write_series(test, series="ID_se1", patient="ID_p1", n=4)
    ct(test / "ID_renamed.dcm", sop_uid="ID_inside", position=(-125.0, -112.0, 99.0))
    summary = prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)
    slices = pd.read_parquet(tmp_path / "clean" / "slices.parquet").set_index("image_id")
    # the sample submission is keyed by file names: the row ID_renamed must find this image
    assert set(slices.index) == {*ids, "ID_renamed"}
    assert slices.loc["ID_renamed", "sop_uid"] == "ID_inside"
    assert (slices.drop(index="ID_renamed")["sop_uid"] == slices.drop(index="ID_renamed").index).all()
    assert summary.id_mismatch == 1
    text = "\n".join(summary.lines())
    assert "warning: 1 file name(s) differ from the SOPInstanceUID" in text
    assert "ID_renamed.dcm holds ID_inside" in text


# --- B: kill -9 must take the workers along ---------------------------------------------------

def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (psutil is not a dependency)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead, only not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_kill_9_of_prepare_data_leaves_no_worker_alive(tmp_path):
    test = tmp_path / "raw" / "stage_2_test"
    test.mkdir(parents=True)
    src = ct(tmp_path / "ID_src.dcm", size=128).read_bytes()
    for k in range(600):  # enough work for the run to outlive the kill (about 2 s of it)
        (test / f"ID_{k:05d}.dcm").write_bytes(src)
    proc = run_prepare(tmp_path, "--split", "test",
                       config="image_size: 64\nn_folds: 2\nn_jobs: 2\nchunk_size: 8\ncrop_border: true\n")
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            workers = _descendants(proc.pid)
            # a finished chunk (renamed into place; not a .tmp file still being written): the rerun must reuse it
            if len(workers) >= 2 and any((tmp_path / "clean" / "test" / "parts").glob("chunk_*.parquet")):
                break  # workers are up and chunks are flowing
            time.sleep(0.05)
        assert proc.poll() is None, f"prepare_data ended before the kill: {proc.communicate()}"
        workers = _descendants(proc.pid)
        assert workers, "no worker process found"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(_running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in workers if _running(pid)]
        assert not alive, f"workers {alive} outlived their killed parent by 10 s"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:  # a failing run must not leave them behind either
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    # and the work done before the kill is kept: a rerun finishes it
    rerun = run_prepare(tmp_path, "--split", "test",
                        config="image_size: 64\nn_folds: 2\nn_jobs: 2\nchunk_size: 8\ncrop_border: true\n")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "test: 600 images" in out and "chunks reused" in out


def _dies_on_the_second_chunk(folder, names, start, clean_dir, cfg):
    """Stands in for ich.prepare._process_chunk in the workers (module level: picklable)."""
    from ich.prepare import _process_chunk
    if start == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's OOM killer
    return _process_chunk(folder, names, start, clean_dir, cfg)


def test_a_worker_killed_mid_run_is_a_one_line_error_and_keeps_finished_chunks(tmp_path, monkeypatch):
    from ich import prepare
    test = tmp_path / "raw" / "stage_2_test"
    write_series(test, series="ID_se1", patient="ID_p1", n=12)
    monkeypatch.setattr(prepare, "_process_chunk", _dies_on_the_second_chunk)
    with pytest.raises(PrepareError, match="worker process died .* rerun the same command"):
        prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)
    monkeypatch.undo()
    summary = prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)
    assert summary.n_images == 12


# --- D: a split without one usable file ------------------------------------------------------

def _only_text(folder):
    (folder / "notes.txt").write_text("not an image\n")


def _only_mr(folder):
    for k in range(3):
        edit(ct(folder / f"ID_mr{k}.dcm"), lambda ds: setattr(ds, "Modality", "MR"))


def _one_truncated_ct(folder):
    path = ct(folder / "ID_cut.dcm")
    path.write_bytes(path.read_bytes()[:400])


@pytest.mark.parametrize("make", [_only_text, _only_mr, _one_truncated_ct])
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_without_a_usable_file_is_a_one_line_error_and_leaves_no_cache(tmp_path, make, split):
    folder = tmp_path / "raw" / f"stage_2_{split}"
    folder.mkdir(parents=True)
    make(folder)
    write_labels(tmp_path / "raw" / "stage_2_train.csv", ["ID_other"])
    proc = run_prepare(tmp_path, "--split", split)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: no usable image among the") and "rejected.csv" in err
    clean = tmp_path / "clean" / split
    assert sorted(p.name for p in clean.iterdir()) == ["rejected.csv"]  # no half-made cache
    rejected = pd.read_csv(clean / "rejected.csv")
    assert sorted(rejected["file"]) == sorted(p.name for p in folder.iterdir())
    assert rejected["reason"].isin(REASONS).all()


# --- G: a header may declare any size; memory must not follow it -----------------------------

def _huge(path, syntax=None, **tags):
    """A tiny file whose header claims a huge image (65535 x 65535 by default)."""
    path = ct(path, transfer_syntax=syntax)

    def claim(ds):
        for k, v in {"Rows": 65535, "Columns": 65535, **tags}.items():
            setattr(ds, k, v)
    return edit(path, claim)


def _myriad_elements(path, n=300_000):
    """A valid slice with n empty private elements in its header: 8 bytes of file each, ~300 bytes
    of Python objects each once parsed (2.4 MB of file would have cost ~100 MB, 8 MB ~310 MB)."""
    good = ct(path).read_bytes()
    at = good.index(b"\x08\x00\x18\x00UI")  # the first data set element
    empty = b"".join(struct.pack("<HH2sH", 0x0009 + 2 * (k // 0xF000), 0x1000 + k % 0xF000, b"SH", 0)
                     for k in range(n))
    path.write_bytes(good[:at] + empty + good[at:])
    return path


HOSTILE = {  # file name -> (how to make it, the reason it must get)
    "ID_elements.dcm": (_myriad_elements, "too_large"),
    "ID_rle_65535.dcm": (lambda p: _huge(p, RLELossless), "bad_shape"),
    "ID_native_65535.dcm": (lambda p: _huge(p), "bad_shape"),
    "ID_frames.dcm": (lambda p: _huge(p, RLELossless, Rows=512, Columns=512, NumberOfFrames=100000), "bad_shape"),
    "ID_bits.dcm": (lambda p: _huge(p, Rows=4096, Columns=4096, BitsAllocated=64), "bad_shape"),
    "ID_samples.dcm": (lambda p: _huge(p, RLELossless, Rows=4096, Columns=4096, SamplesPerPixel=3), "bad_shape"),
}

MEMORY_PROBE = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails the test, not the machine
from ich import prepare
from ich.config import PrepareConfig
t0 = time.time()
prepare.prepare_split(sys.argv[1], sys.argv[2], "test", PrepareConfig(image_size=32, n_jobs=2, chunk_size=2),
                      progress=False)
print("seconds", time.time() - t0)
for pool in getattr(prepare, "_POOLS", {}).values():
    pool.shutdown(wait=True)  # reaps the workers, so that RUSAGE_CHILDREN counts them
# the parent: VmHWM of this process's own memory (ru_maxrss would carry over the high-water mark of the
# process that forked it, e.g. a large pytest, across exec); the workers: RUSAGE_CHILDREN, the largest one
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print("parent_mb", hwm, "worker_mb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def test_huge_declared_shapes_are_rejected_before_decoding_in_bounded_memory(tmp_path):
    test = tmp_path / "raw" / "stage_2_test"
    test.mkdir(parents=True)
    for name, (make, _) in HOSTILE.items():
        make(test / name)
    for k in range(3):
        ct(test / f"ID_good{k}.dcm", position=(0.0, 0.0, 5.0 * k))
    assert max(p.stat().st_size for p in test.iterdir()) < 3_000_000
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "raw"), str(tmp_path / "clean")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    words = proc.stdout.split()
    parent_mb, worker_mb = float(words[words.index("parent_mb") + 1]), float(words[words.index("worker_mb") + 1])
    assert worker_mb < 1024 and parent_mb < 1024, proc.stdout  # RUSAGE_CHILDREN: the largest worker's peak
    assert float(words[words.index("seconds") + 1]) < 60
    rejected = pd.read_csv(tmp_path / "clean" / "rejected.csv").set_index("file")
    for name, (_, reason) in HOSTILE.items():
        assert rejected.loc[name, "reason"] == reason, rejected.loc[name, "detail"]
    assert len(pd.read_parquet(tmp_path / "clean" / "slices.parquet")) == 3


def test_max_pixels_is_a_config_knob_checked_before_decoding(tmp_path):
    path = ct(tmp_path / "ID_a.dcm", size=64)
    assert read_stored(path, max_pixels=64 * 64)[1].shape == (64, 64)
    with pytest.raises(Rejected, match="more than max_pixels") as info:
        read_stored(path, max_pixels=64 * 64 - 1)
    assert info.value.reason == "bad_shape" and info.value.header is not None  # still placed in its series
    with pytest.raises(PrepareError, match="max_pixels must be an integer >= 64"):
        prepare_split(tmp_path, tmp_path / "clean", "test", PrepareConfig(max_pixels=0))


# --- H: reasons that used to mislead --------------------------------------------------------

def test_a_dicom_object_without_an_image_is_no_pixel_data_not_unreadable():
    with pytest.raises(Rejected) as info:
        read_stored(get_testdata_file("DICOMDIR"))
    assert info.value.reason == "no_pixel_data" and "Media Storage Directory" in info.value.detail


def test_a_data_set_without_preamble_and_file_meta_is_read(tmp_path):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    path = ct(tmp_path / "ID_a.dcm")
    _, want = read_stored(path)
    for implicit in (True, False):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, implicit
        write_dataset(fp, pydicom.dcmread(path))
        bare = tmp_path / f"ID_bare{implicit}.dcm"
        bare.write_bytes(fp.getvalue())  # no 128-byte preamble, no DICM, no file meta
        header, got = read_stored(bare)
        assert header.image_id == "ID_a"
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cut", [1000, 2000, 5000])
def test_a_ct_cut_inside_its_header_says_truncated(tmp_path, cut):
    path = tmp_path / "ID_cut.dcm"
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:cut])
    with pytest.raises(Rejected) as info:
        read_stored(path)
    assert info.value.reason == "truncated", info.value


def test_a_ct_cut_inside_its_pixels_says_truncated_and_keeps_its_place(tmp_path):
    path = ct(tmp_path / "ID_a.dcm")
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(Rejected, match="inside the pixel data") as info:
        read_stored(path)
    assert info.value.reason == "truncated" and info.value.header.series_id == "ID_se1"


def test_links_to_nothing_and_devices_are_rejected_not_skipped(tmp_path):
    test = tmp_path / "raw" / "stage_2_test"
    write_series(test, series="ID_se1", patient="ID_p1", n=3)
    (test / "ID_dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    (test / "ID_null.dcm").symlink_to("/dev/null")
    os.mkfifo(test / "ID_fifo.dcm")  # opening it would block for ever
    (test / "subfolder").mkdir()  # folders are no files: skipped
    prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)
    rejected = pd.read_csv(tmp_path / "clean" / "rejected.csv").set_index("file")
    assert set(rejected.index) == {"ID_dangling.dcm", "ID_null.dcm", "ID_fifo.dcm"}
    assert (rejected["reason"] == "not_a_file").all()
    assert "leads nowhere" in rejected.loc["ID_dangling.dcm", "detail"]
    assert "character device" in rejected.loc["ID_null.dcm", "detail"]
    assert "FIFO" in rejected.loc["ID_fifo.dcm", "detail"]


def test_write_atomic_removes_temporary_files_of_dead_processes(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()
    for pid in (dead.pid, live):
        (tmp_path / f".submission.csv.tmp{pid}").write_text("half")
    (tmp_path / ".other.csv.tmp1").write_text("not this target's")
    cache.write_atomic(tmp_path / "submission.csv", lambda p: p.write_text("ID,Label\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.csv.tmp1", f".submission.csv.tmp{live}", "submission.csv"]
