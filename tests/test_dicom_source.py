"""Stage one straight from the DICOMs (input.source: dicom), RAW_DATA_DIR as the competition zip, and
prepare_data without images: the same images, tables and models as the image cache's road."""
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dies_in_epoch, write_config
from ich.config import PrepareConfig
from ich.labels import LABELS
from ich.prepare import PrepareError, prepare_split

CFG = PrepareConfig(image_size=64, n_folds=3, n_jobs=1)  # the `prepared` fixture's settings


def zip_raw(raw, path, *, root="rsna-intracranial-hemorrhage-detection/", extra=None, cut=None):
    """RAW_DATA_DIR as one zip, under a top folder as Kaggle's download; every third member stored without
    compression, the rest deflated. extra: {member name: bytes} added; cut: keep only this many bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for i, p in enumerate(sorted(p for p in raw.rglob("*") if p.is_file())):
            z.write(p, root + p.relative_to(raw).as_posix(),
                    compress_type=zipfile.ZIP_STORED if i % 3 == 0 else zipfile.ZIP_DEFLATED)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    return path


@pytest.fixture(scope="module")
def raw_zip(prepared, tmp_path_factory):
    return zip_raw(prepared / "raw", tmp_path_factory.mktemp("zip") / "rsna-intracranial-hemorrhage-detection.zip")


@pytest.fixture(scope="module")
def no_images(prepared, tmp_path_factory):
    """The train split prepared from the zip with images: false."""
    clean = tmp_path_factory.mktemp("noimg") / "train"
    zipped = zip_raw(prepared / "raw", clean.parent / "data.zip")
    prepare_split(zipped, clean, "train", PrepareConfig(image_size=64, n_folds=3, n_jobs=1, images=False),
                  progress=False)
    return clean, zipped


def test_prepare_without_images_writes_the_same_tables_and_no_image(prepared, no_images):
    clean, _ = no_images
    cached = prepared / "clean" / "train"
    assert not (clean / "images.npy").exists() and not list(clean.rglob("*.npy"))
    a, b = pd.read_parquet(clean / "slices.parquet"), pd.read_parquet(cached / "slices.parquet")
    pd.testing.assert_frame_equal(a, b)  # brain_fraction, folds, cache_row, file: all of it
    pd.testing.assert_frame_equal(pd.read_csv(clean / "rejected.csv"), pd.read_csv(cached / "rejected.csv"))
    assert (clean / "zip_members.parquet").is_file()  # the archive's index, kept beside the slice table


@pytest.mark.parametrize("road", ["folder", "zip"])
def test_dicom_rows_equal_the_cache_bit_for_bit_in_every_input_mode(prepared, raw_zip, road):
    from ich import cache
    from ich.dicom_rows import open_rows
    from models.data import SliceDataset
    from models.experiment import load_train_table
    clean = prepared / "clean" / "train"
    slices = load_train_table(clean)
    rows = open_rows(clean, prepared / "raw" if road == "folder" else raw_zip, slices)
    images = cache.open_images(clean)
    for r in slices["cache_row"]:
        assert np.array_equal(rows[r], images[r]), r
    # the network inputs, neighbours included: the first and last slice of each series and a few inside
    s = slices.reset_index(drop=True)
    picks = sorted(set(s.groupby("series_id").head(2).index) | set(s.groupby("series_id").tail(1).index))[:40]
    for mode, size in (("windows", 48), ("adjacent", 48), ("adjacent_windows", 48)):  # 9 channels shrunk too
        from_cache = SliceDataset(s, clean, mode=mode, channel=1, size=size)
        from_dicom = SliceDataset(s, clean, mode=mode, channel=1, size=size, images=rows)
        for i in picks:
            assert np.array_equal(from_dicom.image(i), from_cache.image(i)), (mode, i)



def test_adjacent_reads_one_window_and_a_repeated_row_is_read_once(prepared, raw_zip, monkeypatch):
    """Adjacent mode reads one window of each neighbour: decoded alone (one window's work), the same bytes as
    the row's; a row read again within a few reads (a series' edge is its own neighbour) is not decoded again,
    and what is kept cannot be changed by its reader."""
    import ich.dicom_rows as dicom_rows
    from ich import cache
    from models.experiment import load_train_table
    clean = prepared / "clean" / "train"
    slices = load_train_table(clean)
    rows = dicom_rows.open_rows(clean, raw_zip, slices)
    images = cache.open_images(clean)
    calls = []
    real = dicom_rows.read_one
    monkeypatch.setattr(dicom_rows, "read_one", lambda ref, cfg: calls.append(len(cfg.windows)) or real(ref, cfg))
    r = int(slices["cache_row"].iloc[0])
    for c in range(len(rows.cfg.windows)):
        assert np.array_equal(rows[r, :, :, c], images[r, :, :, c])
    assert calls == [1] * len(rows.cfg.windows)  # one window decoded per read, not all three
    assert np.array_equal(rows[r, :, :, 1], images[r, :, :, 1]) and np.array_equal(rows[r], images[r])
    assert calls == [1] * len(rows.cfg.windows) + [len(rows.cfg.windows)]  # the repeat came from memory
    with pytest.raises(ValueError):
        rows[r][0, 0, 0] = 1


def test_source_cache_on_a_dir_without_images_is_a_clear_error(no_images, tmp_path):
    from models.config import load_experiment
    from models.experiment import TrainError, stage_one_images
    clean, zipped = no_images
    cfg = load_experiment(write_config(tmp_path))
    with pytest.raises(TrainError, match="no image cache .*set input.source: dicom"):
        stage_one_images(cfg, clean, zipped, pd.read_parquet(clean / "slices.parquet"))


def test_training_from_the_zip_equals_the_cache_road_and_resumes_after_a_kill(prepared, no_images, tmp_path,
                                                                             monkeypatch):
    """Fold 0, 2 epochs: the cache road; then source: dicom from the zip (a dir without images), killed in
    its second epoch and resumed. Same seeds, CPU, no loader workers: the same images in the same order
    make the same arithmetic, so the weights, OOF and test predictions are expected to be equal; the
    tolerance (1e-6) only allows for float summation order, which nothing here changes."""
    from models import experiment, inference, runtime, trainer
    from models.config import load_experiment
    clean_zip, zipped = no_images
    rt = runtime.setup("none", False)
    small = {"size": 32}  # a quarter of the compute; the images are still decoded at the cache's 64 px
    cfg_cache = load_experiment(write_config(tmp_path, "road", train={"epochs": 2}, input=small))
    cfg_dicom = load_experiment(write_config(tmp_path, "road", train={"epochs": 2}, input={**small, "source": "dicom"}))
    kw = dict(logs_dir=tmp_path / "logs", runtime=rt, folds=[0], progress=False, log=lambda *a: None)
    experiment.run_experiment(cfg_cache, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "cache", **kw)
    real = dies_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cfg_dicom, clean_dir=clean_zip, model_dir=tmp_path / "dicom", raw_dir=zipped, **kw)
    monkeypatch.setattr(trainer, "run_epoch", real)
    assert not (tmp_path / "dicom" / "road" / "fold0.oof.parquet").exists()
    experiment.run_experiment(cfg_dicom, clean_dir=clean_zip, model_dir=tmp_path / "dicom", raw_dir=zipped,
                              resume=True, **kw)
    a = torch.load(tmp_path / "cache" / "road" / "fold0.pt", weights_only=True)
    b = torch.load(tmp_path / "dicom" / "road" / "fold0.pt", weights_only=True)
    assert a["image_settings"] == b["image_settings"] and b["epoch"] == 2
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], atol=1e-6, rtol=0, msg=key)
    oof_a = pd.read_parquet(tmp_path / "cache" / "road" / "fold0.oof.parquet")
    oof_b = pd.read_parquet(tmp_path / "dicom" / "road" / "fold0.oof.parquet")
    assert oof_a["image_id"].tolist() == oof_b["image_id"].tolist()
    np.testing.assert_allclose(oof_b[list(LABELS)], oof_a[list(LABELS)], atol=1e-6, rtol=0)
    # test predictions of the two kept models on the test split (the streamed road decodes with the same code)
    test = pd.read_parquet(prepared / "clean" / "test" / "slices.parquet")
    probs = []
    for ckpt in (a, b):
        model = trainer.build_model(cfg_cache, rt, ckpt["in_chans"])
        model.load_state_dict(ckpt["state_dict"])
        data = trainer.make_dataset(cfg_cache, test, prepared / "clean" / "test", 32, train=False)
        probs.append(inference.predict(model, inference.make_loader(data, rt, 32, 0), rt, progress=False)[0])
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-6, rtol=0)


def test_zip_members_stored_deflated_and_zip64_give_the_folder_tables(prepared, tmp_path, monkeypatch):
    raw = prepared / "raw"
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1 << 10)  # every size and offset in zip64 extra fields,
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 16)  # and the zip64 end of central directory
    zipped = zip_raw(raw, tmp_path / "zip64.zip")
    monkeypatch.undo()
    assert b"PK\x06\x06" in zipped.read_bytes()[-4096:]  # the zip64 end record is there
    infos = zipfile.ZipFile(zipped).infolist()
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    s = prepare_split(zipped, tmp_path / "clean", "test", CFG, progress=False)
    assert s.n_images > 0
    for name in ("slices.parquet",):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "clean" / name),
                                      pd.read_parquet(prepared / "clean" / "test" / name))
    assert np.array_equal(np.load(tmp_path / "clean" / "images.npy"),
                          np.load(prepared / "clean" / "test" / "images.npy"))


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_a_damaged_member_is_rejected_with_a_reason_and_the_rest_prepared(prepared, tmp_path, monkeypatch, inflater):
    from ich import rawdata
    if inflater == "zlib":
        monkeypatch.setattr(rawdata, "fast_zlib", None)  # zipfile's own reading, as without isal
    elif rawdata.fast_zlib is None:
        pytest.skip("isal is not installed (requirements-base.txt)")
    raw = tmp_path / "raw"
    shutil.copytree(prepared / "raw" / "stage_2_test", raw / "stage_2_test")
    zipped = zip_raw(raw, tmp_path / "data.zip")
    victim = [i for i in zipfile.ZipFile(zipped).infolist() if i.compress_type == zipfile.ZIP_DEFLATED
              and i.filename.endswith(".dcm")][0]
    data = bytearray(zipped.read_bytes())
    at = victim.header_offset + 30 + len(victim.filename) + 200  # inside its compressed data
    data[at:at + 64] = bytes(64)
    zipped.write_bytes(bytes(data))
    s = prepare_split(zipped, tmp_path / "clean", "test", CFG, progress=False)
    rejected = pd.read_csv(tmp_path / "clean" / "rejected.csv")
    name = victim.filename.rsplit("/", 1)[1]
    assert rejected["file"].tolist() == [name] and rejected["reason"].iloc[0] == "unreadable"
    assert "zip member damaged" in rejected["detail"].iloc[0]
    assert s.n_images == s.n_files - 1


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a readable zip archive"),
    ("climbing", "climb out of the archive"),
])
def test_a_truncated_or_crafted_archive_is_one_line(prepared, tmp_path, how, message):
    import subprocess
    import sys
    from conftest import REPO, write_paths
    raw = tmp_path / "raw"
    shutil.copytree(prepared / "raw" / "stage_2_test", raw / "stage_2_test")
    if how == "truncated":
        zipped = zip_raw(raw, tmp_path / "data.zip")
        zip_raw(raw, zipped, cut=zipped.stat().st_size // 2)
    else:
        zipped = zip_raw(raw, tmp_path / "data.zip", extra={"../stage_2_test/ID_evil.dcm": b"x"})
    settings = write_paths(tmp_path / "s.json", raw=zipped, train=tmp_path / "train", test=tmp_path / "test",
                           root=tmp_path)
    out = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--settings", str(settings), "--split",
                          "test", "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "test" / "slices.parquet").exists()


def test_predict_streams_the_test_split_from_the_zip(prepared, trained, study_models, raw_zip, tmp_path):
    """predict.py with RAW_DATA_DIR the zip and a test split prepared without images: stage one streams the
    zip's members (no image written) and gives the cached road's per-fold-model outputs."""
    from conftest import link_models, run_script, write_paths
    _, _, work = trained
    _, cfg, cached_root = study_models
    link_models(work / "models" / "tiny", tmp_path / "models" / "tiny")
    test = tmp_path / "clean_test"
    prepare_split(raw_zip, test, "test", PrepareConfig(image_size=64, n_folds=3, n_jobs=1, images=False),
                  progress=False)
    settings = write_paths(tmp_path / "s.json", raw=raw_zip, train=prepared / "clean" / "train", test=test,
                           root=tmp_path)
    out = run_script("predict.py", "--settings", settings, "--config", cfg, "--stage1-only")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage one streamed" in out.stdout and "no image written" in out.stdout
    for k in range(3):
        a = pd.read_parquet(tmp_path / "models" / "tiny" / f"test_fold{k}.parquet")
        b = pd.read_parquet(cached_root / "models" / "tiny" / f"test_fold{k}.parquet")
        assert a["image_id"].tolist() == b["image_id"].tolist()
        np.testing.assert_allclose(a[list(LABELS)].to_numpy(), b[list(LABELS)].to_numpy(), atol=2e-6, rtol=0)
    assert not list(test.rglob("images.npy")) and (test / "streamed" / "zip_members.parquet").is_file()
    sub = pd.read_csv(tmp_path / "sub" / "submission_stage1.csv")
    assert len(sub) == len(pd.read_csv(prepared / "raw" / "stage_2_sample_submission.csv"))


def test_lr_finder_reads_the_zip_in_loader_workers_as_the_cache(prepared, no_images, tmp_path):
    """The LR finder with input.source: dicom, from the zip of a dir prepared without images, in two loader
    workers (each with its own handle on the archive): the same learning rates and losses as from the cache
    (same seeds, CPU; 1e-6 allows for float summation order only)."""
    from models import runtime
    from models.config import load_experiment
    from models.experiment import load_train_table, stage_one_images
    from models.lr_finder import find_lr
    clean_zip, zipped = no_images
    cached = prepared / "clean" / "train"
    rt = runtime.setup("none", False)
    out = {}
    for source, clean, raw in (("cache", cached, None), ("dicom", clean_zip, zipped)):
        cfg = load_experiment(write_config(tmp_path, f"lr_{source}", input={"size": 32, "source": source},
                                           train={"num_workers": 2}))
        slices = load_train_table(clean)
        out[source] = find_lr(cfg, slices, clean, rt, tmp_path / f"{source}.png", steps=6, progress=False,
                              images=stage_one_images(cfg, clean, raw, slices))
    assert len(out["dicom"]["losses"]) == 6
    for key in ("lrs", "losses", "suggested_lr"):
        np.testing.assert_allclose(np.asarray(out["dicom"][key], float), np.asarray(out["cache"][key], float),
                                   atol=1e-6, rtol=0, err_msg=key)
