"""The in-memory engine (pipeline.engine) is the batch path: same images, same probabilities, same rejections,
and predict.py without a test cache gives the cached submission while writing no image."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import link_models, run_script, write_paths
from ich.labels import LABELS


def cpu():
    from models.runtime import setup
    return setup("none", False)


@pytest.fixture(scope="module")
def streamed(prepared, trained, study_models, tmp_path_factory):
    """predict.py with the same models and config as study_models, but no test cache: it streams."""
    _, _, work = trained
    _, cfg, _ = study_models
    root = tmp_path_factory.mktemp("streamed")
    link_models(work / "models" / "tiny", root / "models" / "tiny")
    settings = write_paths(root / "settings.json", raw=prepared / "raw", train=prepared / "clean" / "train",
                           test=root / "clean_test", root=root)
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    return settings, cfg, root, out


def test_streamed_submission_equals_the_cached_one_and_writes_no_image(streamed, study_models):
    settings, cfg, root, out = streamed
    _, _, cached_root = study_models
    assert "stage one streamed" in out.stdout and "no image written" in out.stdout
    got = pd.read_csv(root / "sub" / "submission.csv").set_index("ID")
    want = pd.read_csv(cached_root / "sub" / "submission.csv").set_index("ID")
    assert len(got) == len(want) > 0 and set(got.index) == set(want.index)
    np.testing.assert_allclose(got.loc[want.index, "Label"].to_numpy(), want["Label"].to_numpy(), atol=1e-5, rtol=0)
    for k in range(3):  # every fold model's outputs, rows as the cached ones
        a = pd.read_parquet(root / "models" / "tiny" / f"test_fold{k}.parquet")
        b = pd.read_parquet(cached_root / "models" / "tiny" / f"test_fold{k}.parquet")
        assert a["image_id"].tolist() == b["image_id"].tolist()
        np.testing.assert_allclose(a[list(LABELS)].to_numpy(), b[list(LABELS)].to_numpy(), atol=2e-6, rtol=0)
        a, b = (np.load(r / "models" / "tiny" / f"test_fold{k}_pcs.npy") for r in (root, cached_root))
        assert a.dtype == np.float32 and a.shape == b.shape and a.shape[1] == 2  # pca_width of the config
        # the kept PCA scores of float16 embeddings: their rounding (1e-2 relative) carried through the PCA
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), np.abs(a - b).max()
    written = sorted(p.relative_to(root / "clean_test").as_posix() for p in (root / "clean_test").rglob("*")
                     if p.is_file())
    assert written == ["streamed/key.json", "streamed/rejected.csv", "streamed/slices.parquet"]
    assert sum((root / "clean_test" / p).stat().st_size for p in written) < 1 << 20
    assert not list((root / "models").rglob("*.part"))  # the scores' raw parts are gone
    record = json.loads((root / "sub" / "submission.provenance.json").read_text())
    assert record["test_road"] == "streamed"


def test_both_sources_have_one_key_and_one_writer(streamed, study_models):
    """One stage-one loop, one owner of contract 2's files (ich.stage_one): the cached and the streamed run
    wrote the same set of files and keys that differ only in the source (the same test files, digested
    the same way, the same checkpoints and image settings)."""
    _, _, root, _ = streamed
    _, _, cached_root = study_models
    keys = {name: json.loads((r / "models" / "tiny" / "test_meta.json").read_text())
            for name, r in (("dicom", root), ("cache", cached_root))}
    assert keys["dicom"].pop("source") == "dicom" and keys["cache"].pop("source") == "cache"
    assert keys["dicom"] == keys["cache"] and keys["cache"]["n_files"] > 0
    names = [sorted(p.name for p in (r / "models" / "tiny").iterdir() if p.name.startswith("test"))
             for r in (root, cached_root)]
    # the default road keeps each fold model's PCA scores and the PCAs they came through, no embeddings
    assert names[0] == names[1] == sorted(["test.parquet", "test_meta.json", "test_pca.joblib",
                                           *(f"test_fold{k}{s}" for k in range(3) for s in (".parquet", "_pcs.npy"))])


def test_kept_scores_give_the_submission_of_the_embeddings_road(study_models, prepared, trained, tmp_path):
    """predict.py keeping the test embeddings (`test_embeddings: true`, the road before) and predict.py
    keeping only their PCA scores (the default, study_models) write the same submission: the same float16
    embeddings through the same PCA (fitted on the same OOF rows), so the stage-two inputs differ at most
    in the scores' last float32 bit; 1e-6 on the probabilities leaves room for that and nothing more
    (tests/test_stage_two_kept.py says why)."""
    from conftest import write_predict_config
    _, _, work = trained
    _, _, kept_root = study_models
    link_models(work / "models" / "tiny", tmp_path / "models" / "tiny")
    settings = write_paths(tmp_path / "settings.json", raw=prepared / "raw", train=prepared / "clean" / "train",
                           test=prepared / "clean" / "test", root=tmp_path)
    cfg = write_predict_config(tmp_path / "study.yaml", test_embeddings=True)
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    got = pd.read_csv(tmp_path / "sub" / "submission.csv").set_index("ID")
    want = pd.read_csv(kept_root / "sub" / "submission.csv").set_index("ID")
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.loc[want.index, "Label"].to_numpy(), want["Label"].to_numpy(), atol=1e-6, rtol=0)
    emb_dir, kept_dir = tmp_path / "models" / "tiny", kept_root / "models" / "tiny"
    assert sorted(p.name for p in emb_dir.glob("test_fold*_emb.npy")) == [f"test_fold{k}_emb.npy" for k in range(3)]
    assert not list(kept_dir.glob("test_fold*_emb.npy")) and not (emb_dir / "test_pca.joblib").exists()
    kept_bytes = sum(p.stat().st_size for p in kept_dir.glob("test_fold*_pcs.npy"))
    assert kept_bytes < sum(p.stat().st_size for p in emb_dir.glob("test_fold*_emb.npy")) / 4


def test_a_second_run_reuses_the_streamed_outputs(streamed):
    settings, cfg, root, _ = streamed
    before = (root / "models" / "tiny" / "test_fold0.parquet").stat().st_mtime_ns
    out = run_script("predict.py", "--settings", settings, "--config", cfg, "--stage1-only")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage-one test outputs reused" in out.stdout
    assert (root / "models" / "tiny" / "test_fold0.parquet").stat().st_mtime_ns == before


def test_fold_zero_held_out_images_through_the_engine_give_its_oof(prepared, trained):
    """Windows, resizing, neighbours, normalization, TTA and the sampler correction agree with training."""
    from pipeline.batch import series_groups
    from pipeline.engine import Engine, Sink
    from stacking.config import PredictCfg
    _, _, work = trained
    slices = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    held = set(slices.loc[slices["fold"] == 0, "image_id"])
    folder = prepared / "raw" / "stage_2_train"
    names = sorted(f"{i}.dcm" for i in held)
    groups = [g for g in series_groups([folder / n for n in names], names, 1 << 22, 0, progress=False)]
    engine = Engine(PredictCfg(name="t", experiments=["tiny"], batch_size=7), work / "models", cpu(), stage_two=False)
    sink = engine.stage_one(groups, Sink())
    got = pd.DataFrame(sink.outputs()["tiny", 0][0], columns=list(LABELS), index=sink.slices()["image_id"])
    oof = pd.read_parquet(work / "models" / "tiny" / "fold0.oof.parquet").set_index("image_id")
    assert len(got) == len(oof) > 20 and set(got.index) == set(oof.index)
    np.testing.assert_allclose(got.loc[oof.index].to_numpy(), oof[list(LABELS)].to_numpy(), atol=2e-5, rtol=0)
    other = pd.DataFrame(sink.outputs()["tiny", 1][0], columns=list(LABELS), index=got.index)
    assert np.abs(other.loc[oof.index].to_numpy() - oof[list(LABELS)].to_numpy()).max() > 1e-3  # a real check


def test_the_engine_rejects_what_prepare_data_rejects_with_the_same_reason(tmp_path):
    from test_bad_input import CFG, HOSTILE, ct, edit

    from ich.prepare import TEST_DIR, list_files, prepare_split
    from pipeline.batch import series_groups
    from pipeline.decode import Decoder, InputSpec
    folder = tmp_path / "raw" / TEST_DIR
    folder.mkdir(parents=True)
    for k in range(4):
        ct(folder / f"ID_ok{k}.dcm")
    (folder / "notes.txt").write_text("not an image\n")
    edit(ct(folder / "ID_mr.dcm"), lambda ds: setattr(ds, "Modality", "MR"))
    cut = ct(folder / "ID_cut.dcm")
    cut.write_bytes(cut.read_bytes()[:400])
    for name in ("ID_rle_65535.dcm", "ID_bits.dcm"):
        HOSTILE[name][0](folder / name)
    (folder / "ID_nowhere.dcm").symlink_to(tmp_path / "missing")
    prepare_split(tmp_path / "raw", tmp_path / "clean", "test", CFG, progress=False)
    want = pd.read_csv(tmp_path / "clean" / "rejected.csv").set_index("file")["reason"].to_dict()
    assert len(want) == 6
    decoder = Decoder(CFG, [InputSpec("windows", 0, 32)], num_workers=0)
    names = list_files(folder)
    groups = series_groups([folder / n for n in names], names, CFG.max_pixels, 0, progress=False)
    decoded = list(decoder(groups))
    got = pd.concat([d.rejected for d in decoded]).set_index("file")["reason"].to_dict()
    assert got == want
    usable = pd.concat([d.slices for d in decoded])
    cached = pd.read_parquet(tmp_path / "clean" / "slices.parquet")
    assert sorted(usable["image_id"]) == sorted(cached["image_id"]) and len(usable) == 4

    # the same files given as bytes (a caller that holds them in memory): the same reasons and images
    from pipeline.decode import SliceFile
    regular = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]
    (as_bytes,) = decoder([[SliceFile(p.read_bytes(), p.name, None) for p in regular]])
    assert as_bytes.rejected.set_index("file")["reason"].to_dict() == {
        f: r for f, r in want.items() if f != "ID_nowhere.dcm"}
    (as_paths,) = decoder([[SliceFile(str(p), p.name, None) for p in regular]])
    assert as_bytes.slices["image_id"].tolist() == as_paths.slices["image_id"].tolist()
    spec = InputSpec("windows", 0, 32)
    assert np.array_equal(as_bytes.inputs[spec].numpy(), as_paths.inputs[spec].numpy())


def test_no_test_cache_and_no_test_dicoms_is_one_line(prepared, study_models, tmp_path):
    import shutil
    _, cfg, root = study_models
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(prepared / "raw" / "stage_2_sample_submission.csv", raw)
    settings = write_paths(tmp_path / "settings.json", raw=raw, train=prepared / "clean" / "train",
                           test=tmp_path / "clean_test", root=root)
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no stage_2_test/ folder under RAW_DATA_DIR" in out.stderr and "no test cache" in out.stderr
