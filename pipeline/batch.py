"""Batch predict, the body of predict.py: stage one on the test set, stage two, submission.csv.

Stage one on the test set is one loop, the in-memory engine's
(pipeline.engine), fed from one of two sources, and writes contract 2's
test outputs through their owner (ich.stage_one: test_fold{k}.parquet per
fold model with, for stage two's PCA features, test_fold{k}_pcs.npy (the
embeddings' scores through stage two's PCA of that fold model, fitted on
the OOF embeddings before the loop: stacking.stage_one.fit_test_pcas, saved
as test_pca.joblib) or, with procrustes alignment or `test_embeddings:
true`, test_fold{k}_emb.npy; test.parquet their mean, test_meta.json the
key of what made them):

- cache: TEST_DATA_CLEAN_PATH holds a test cache that `prepare_data.py
  --split test` built; the engine reads its rows (pipeline.decode.CachedSlices;
  the images were decoded once, before).
- dicom: no test cache there. The test DICOMs of RAW_DATA_DIR are streamed:
  headers read once to group the files into series, then each series
  decoded in DataLoader workers with prepare_data's own code. No image is
  written: a Kaggle kernel needs no 95 GB scratch. The slice table and
  rejected files (what prepare_data would have written) go to
  TEST_DATA_CLEAN_PATH/streamed/, a few MB, so a rerun with the same
  checkpoints and files reuses the outputs.

Either way each batch runs through every fold model of every experiment
before the next, and each fold model's scores (or embeddings) stream to
disk as they come. Both sources give the same submission (tests/test_streaming.py).
Series are decoded in series_id order, so the streamed slice table has
prepare_data's row order.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ich import provenance, stage_one
from ich.cache import files_digest, read_meta, write_atomic
from ich.dicom_rows import has_images
from ich.labels import LABELS
from ich.prepare import TEST_DIR, PrepareError
from ich.rawdata import RawDataError, open_raw, readable
from ich.submission import build_submission, read_sample, score_submission, write_submission
from models.predict_split import check_same_cache

from .decode import CachedSlices, SliceFile, as_is
from .engine import Engine, Sink

KAGGLE = "rsna-intracranial-hemorrhage-detection"
STREAMED = "streamed"          # TEST_DATA_CLEAN_PATH/streamed/: the streamed slice table, rejected files, key
SCAN_CHUNK = 256               # files per header-scan task


# --- the header scan: which files make which series ----------------------------------------------
class _Headers(Dataset):
    """A chunk of files (paths or zip members: ich.rawdata) -> [series_id or None] (None: the header
    cannot be read; the decode step rejects that file with prepare_data's reason)."""

    def __init__(self, chunks: list[list], max_pixels: int):
        self.chunks, self.max_pixels = chunks, max_pixels

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        import warnings

        from ich.dicom import max_file_bytes, read_header
        out = []
        for ref in self.chunks[i]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out.append(read_header(readable(ref, max_file_bytes(self.max_pixels)), self.max_pixels).series_id)
            except Exception:  # noqa: BLE001 - Rejected or worse: the decode step gives the reason
                out.append(None)
        return out


def series_groups(refs: list, names: list[str], max_pixels: int, num_workers: int,
                  progress: bool = True) -> list[list[SliceFile]]:
    """The files of a split (refs: their paths or zip members, ich.rawdata; names: their names) grouped by
    series (headers only, in DataLoader workers), series in series_id order; a file whose header cannot be
    read is a group of its own, last."""
    chunks = [refs[i:i + SCAN_CHUNK] for i in range(0, len(refs), SCAN_CHUNK)]
    loader = DataLoader(_Headers(chunks, max_pixels), batch_size=None, num_workers=num_workers,
                        collate_fn=as_is)
    series = []
    for part in tqdm(loader, total=len(chunks), desc="read test headers", unit="chunk", disable=not progress,
                     leave=False):
        series.extend(part)
    by_series: dict[str, list[SliceFile]] = {}
    lone = []
    for ref, name, sid in zip(refs, names, series):
        f = SliceFile(ref, name, None)
        if sid is None or not isinstance(sid, str) or not sid:
            lone.append([f])
        else:
            by_series.setdefault(sid, []).append(f)
    return [by_series[s] for s in sorted(by_series)] + lone


# --- the streaming sink: embeddings (or their PCA scores) to disk as they come ------------------
NPY_HEADER = 128  # bytes kept at the start of each rows file for its .npy header


def npy_header(shape: tuple, dtype=np.float16) -> bytes:
    """A version 1.0 .npy header of exactly NPY_HEADER bytes (numpy's format: magic, version, length, a
    dict padded with spaces and ended by a newline) for a C-ordered array of `shape`."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
    body = text.ljust(NPY_HEADER - 10 - 1) + "\n"
    if len(body) != NPY_HEADER - 10:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class StreamSink(Sink):
    """Keeps the slice tables and probabilities; appends each fold model's embeddings, or with
    `transforms` their scores (transforms[key].transform: stage two's PCA of that fold model, fitted
    before test inference), to its file as they come (no image is kept: a group's inputs are dropped
    once run). No parts: nothing of the embeddings is written (no PCA features).

    Each file is written in place as an .npy: room for the header first, the
    rows after it, the header filled in once the row count is known, then the
    file renamed to its final name. No second copy: the disk a fold model's
    rows take is their own size (scores: pca_width float32 columns, against
    2,048 float16 for a ResNeXt's embeddings)."""

    def __init__(self, parts: dict[tuple, Path] | None, transforms: dict | None = None):
        super().__init__(keep_embeddings=False)
        self.parts = parts or {}
        self.transforms = transforms
        self.files = {key: open(path, "wb") for key, path in self.parts.items()}
        for f in self.files.values():
            f.write(b"\0" * NPY_HEADER)
        self.dims: dict[tuple, int] = {}

    def add_group(self, decoded) -> None:
        self.groups.append(dataclasses.replace(decoded, inputs={}, images=None))

    def add_outputs(self, key, probs, emb) -> None:
        super().add_outputs(key, probs, None)
        if key not in self.files:
            return
        if self.transforms is None:
            rows = np.ascontiguousarray(emb, np.float16)
        else:  # the float16 embeddings the file road would store, through the fold model's PCA
            rows = np.ascontiguousarray(self.transforms[key].transform(np.asarray(emb, np.float32)), np.float32)
        self.dims[key] = rows.shape[1]
        self.files[key].write(rows.tobytes())

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def finish(self, key, rows: int) -> Path:
        """One fold model's rows file, its header filled in: a complete .npy of rows x dim, float16
        embeddings or float32 scores (still at its part path: the outputs' owner renames it into place)."""
        part = self.parts[key]
        with open(part, "r+b") as f:
            f.write(npy_header((rows, self.dims.get(key, 0)), np.float16 if self.transforms is None else np.float32))
        return part


def stage_one_test(cfg, settings, runtime, *, force: bool = False, progress: bool = True, log=print):
    """Stage one on the test split through the engine -> (test slices, rejected, {experiment: fold-mean
    table}); from the test cache when there is one, else streamed from RAW_DATA_DIR's test DICOMs (its
    folder, or the competition zip read in place: ich.rawdata)."""
    from stacking.stage_one import fit_test_pcas, kept_of_test

    test_dir = settings.test_clean_dir
    cached = has_test_cache(test_dir)
    out_dir = test_dir / STREAMED
    if cached:
        check_same_cache(settings.train_clean_dir, test_dir)
        meta = read_meta(test_dir)
        slices = pd.read_parquet(test_dir / "slices.parquet")
        rejected = pd.read_csv(test_dir / "rejected.csv") if (test_dir / "rejected.csv").is_file() else None
        source, n_files, digest = "cache", meta.get("n_files"), meta.get("files_digest")
        cache = CachedSlices(test_dir, slices)
    else:
        try:
            raw = open_raw(settings.raw_data_dir)
            names = raw.names(TEST_DIR, out_dir)  # a zip's member index is kept beside the streamed slice table
            if names is None:
                raise PrepareError(f"no {TEST_DIR}/ folder under RAW_DATA_DIR ({settings.raw_data_dir}) and no "
                                   f"test cache in {test_dir}: nothing to predict")
            refs = raw.refs(TEST_DIR, names, out_dir)
        except RawDataError as exc:
            raise PrepareError(str(exc)) from None
        if not names:
            raise PrepareError(f"{raw.where(TEST_DIR)} holds no files")
        source, n_files, digest, cache = "dicom", len(names), files_digest(names), None
    engine = Engine(cfg, settings.model_checkpoint_dir, runtime, stage_two=False, num_workers=cfg.num_workers,
                    train_dir=settings.train_clean_dir, cache=cache)
    try:
        dirs = {exp: settings.model_checkpoint_dir / exp for exp in cfg.experiments}
        kept = kept_of_test(cfg)  # what is kept of the embeddings: their PCA scores, themselves, or nothing
        kind = stage_one.kept_kind(kept)
        keys = {exp: stage_one.outputs_key(source, {f.k: f.path for f in engine.fold_models if f.experiment == exp},
                                           engine.image_settings, n_files, digest, kept) for exp in cfg.experiments}
        if not force and all(stage_one.reusable(dirs[exp], keys[exp]) for exp in cfg.experiments) and (
                cached or _streamed_table(out_dir) == keys):
            log(f"stage-one test outputs reused (same checkpoints, image settings and test files, from the "
                f"{'test cache' if cached else 'test DICOMs'})")
            if not cached:
                slices = pd.read_parquet(out_dir / "slices.parquet")
                rejected = pd.read_csv(out_dir / "rejected.csv", keep_default_na=False)
            return slices, rejected, {exp: stage_one.read_mean(dirs[exp]) for exp in cfg.experiments}
        for exp in cfg.experiments:
            stage_one.invalidate(dirs[exp])
        (out_dir / "key.json").unlink(missing_ok=True)
        t0 = time.time()
        groups = cache.groups() if cached else series_groups(refs, names, engine.prepare_cfg.max_pixels,
                                                              cfg.num_workers, progress)
        pcas = None
        if kind == "scores":  # stage two's PCAs, from the OOF embeddings alone: test keeps only their scores
            t1 = time.time()
            pcas = fit_test_pcas(cfg, settings.model_checkpoint_dir,
                                 pd.read_parquet(settings.train_clean_dir / "slices.parquet"))
            log(f"stage two's PCA per fold model fitted on the OOF embeddings in {time.time() - t1:.0f} s: "
                f"test inference keeps {cfg.pca_width} scores per image and fold model, not the embeddings")
        sink = StreamSink({f.key: stage_one.fold_test_part(dirs[f.experiment], f.k, kind)
                           for f in engine.fold_models} if kind else None, pcas)
        bar = tqdm(total=len(slices) if cached else len(names), unit="img", smoothing=0.1, disable=not progress,
                   desc=f"stage one ({'test cache' if cached else 'streamed test DICOMs'})")
        try:
            engine.stage_one(groups, sink, progress=bar.update)
        finally:
            bar.close()
            sink.close()
        done = sink.slices()
        if done.empty:
            raise PrepareError(f"no usable image among the {n_files} test file(s)")
        outputs = sink.outputs()
        ids = done["image_id"].to_numpy()
        tables = {}
        for exp in cfg.experiments:
            folds = [f.k for f in engine.fold_models if f.experiment == exp]
            tables[exp] = stage_one.write_outputs(
                dirs[exp], keys[exp], ids, {k: outputs[exp, k][0] for k in folds},
                {k: sink.finish((exp, k), len(done)) for k in folds} if kind else None,
                {"spec": kept, "models": {k: pcas[exp, k] for k in folds}} if pcas else None)
        if not cached:
            slices, rejected = done, sink.rejected()
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(out_dir / "slices.parquet", lambda p: slices.to_parquet(p, index=False))
            write_atomic(out_dir / "rejected.csv", lambda p: rejected.to_csv(p, index=False))
            write_atomic(out_dir / "key.json", lambda p: p.write_text(json.dumps(keys, indent=1)))
        seconds = max(time.time() - t0, 1e-9)
        log(f"stage one {'from the test cache' if cached else 'streamed'}: {n_files} test files ({len(done)} "
            f"usable) through {len(engine.fold_models)} fold models in {seconds:.0f} s ({len(done) / seconds:.1f} "
            f"img/s){'' if cached else '; no image written'}")
        return slices, rejected, tables
    finally:
        engine.close()


def _streamed_table(out_dir: Path):
    """The key the streamed slice table in out_dir was written with (None: none there)."""
    try:
        key = json.loads((out_dir / "key.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return key if (out_dir / "slices.parquet").is_file() else None


def has_test_cache(test_dir: Path) -> bool:
    """A test image cache to read (a test split prepared with `images: false` has none: it is streamed)."""
    return (test_dir / "slices.parquet").is_file() and read_meta(test_dir) is not None and has_images(test_dir)


def predict(settings, cfg, *, stage1_only: bool = False, force: bool = False, progress: bool = True) -> Path:
    """predict.py without its argument parsing: see the module docstring and entry_points.md."""
    from ich.settings import require_writable
    from models import runtime as rt
    from models.predict_split import training_records
    from stacking.run import run_stacking

    # stage one and two take hours on the real data: find a read-only output folder now, not at the last write
    require_writable({"MODEL_CHECKPOINT_DIR": settings.model_checkpoint_dir, "LOGS_DIR": settings.logs_dir,
                      "SUBMISSION_DIR": settings.submission_dir})
    test_dir, train_dir = settings.test_clean_dir, settings.train_clean_dir
    try:
        raw = open_raw(settings.raw_data_dir)
    except RawDataError as exc:
        raise PrepareError(str(exc)) from None
    sample = read_sample(raw.csv("stage_2_sample_submission.csv"))
    if not (train_dir / "slices.parquet").is_file():
        raise FileNotFoundError(f"{train_dir / 'slices.parquet'} not found: run prepare_data.py --split train")
    train_slices = pd.read_parquet(train_dir / "slices.parquet")
    prior = train_slices[list(LABELS)].mean().to_numpy()
    trained = training_records(settings.model_checkpoint_dir, cfg.experiments, train_dir)
    streamed = not has_test_cache(test_dir)
    if streamed:
        require_writable({"TEST_DATA_CLEAN_PATH": test_dir})
    runtime = rt.setup(cfg.amp, True)
    device = runtime.describe()
    try:
        test_slices, rejected, stage1 = stage_one_test(cfg, settings, runtime, force=force, progress=progress)
    finally:
        rt.teardown()
    mean1 = test_slices[["image_id"]].reset_index(drop=True)  # each experiment's fold mean, then their mean
    mean1[list(LABELS)] = np.mean([t.set_index("image_id").loc[mean1["image_id"], list(LABELS)].to_numpy()
                                   for t in stage1.values()], axis=0)
    subs = {"stage one": build_submission(sample, mean1, prior=prior, test_slices=test_slices,
                                          rejected=rejected, clip=cfg.clip)}
    if not stage1_only:
        result = run_stacking(cfg, train_slices=train_slices, test_slices=test_slices,
                              model_dir=settings.model_checkpoint_dir, logs_dir=settings.logs_dir, progress=progress)
        members = result["member_tests"] if len(result["member_tests"]) > 1 else {}
        for name, preds in [*((f"stage two: {m}", t) for m, t in members.items()), ("stage two", result["test"])]:
            subs[name] = build_submission(sample, preds, prior=prior, test_slices=test_slices,
                                          rejected=rejected, clip=cfg.clip)
    final = "stage one" if stage1_only else "stage two"
    name = "submission_stage1.csv" if stage1_only else "submission.csv"
    sub, stats = subs[final]
    path = write_submission(sub, settings.submission_dir / name)
    made_by = {**provenance.record(dataclasses.asdict(cfg), device, None if streamed else test_dir), "kind": final,
               "test_road": "streamed" if streamed else "cached",
               "train_cache_files_digest": (read_meta(train_dir) or {}).get("files_digest"), "experiments": trained}
    record_path = provenance.write_sidecar(path, made_by)
    print(f"\nsubmission ({final}): {path}  ({len(sub)} rows; {stats.line()})")
    print(f"made by: {provenance.summary(made_by)} -> {record_path}")
    labels_csv = raw.csv("stage_2_test_labels.csv")
    if labels_csv is not None:
        scores = {k: score_submission(s, labels_csv) for k, (s, _) in subs.items()}
        print("test weighted log loss (labels known): "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
    print(f"submit: kaggle competitions submit -c {KAGGLE} -f {path} -m \"{cfg.name}\"")
    return path
