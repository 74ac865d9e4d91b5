"""The inference engine: every fold model of every experiment and the trained stage two, held in memory;
DICOM slices in, six probabilities per slice out, with no detour through disk.

Loaded once (`Engine(...)`): each experiment's fold checkpoints on the
configured device (compiled where the experiment asks for it), the image
settings they were trained on (`image_settings` in each checkpoint: the
train cache's; every fold model must agree), and, for the study path, the
saved stage two (stacking.apply.SavedStageTwo: boosters, aligned PCAs,
sequence members, blend). The engine knows what it loaded: nothing is read
or hashed again per call.

A call (`stage_one`, `predict`) hands groups of whole series to the
decoder (pipeline.decode: DataLoader workers run prepare_data's own
`decode_files` and stage one's own SliceDataset), cuts the decoded slices
into batches of `batch_size` across series, and runs each batch through
every fold model of every experiment before the next batch: each image is
decoded once. Per fold model it keeps what stage two needs (probabilities,
embeddings: a `Sink` decides where they go), and `predict` pairs fold
model k with stage-two member k as stacking.apply does from files.

Three users: the study path (pipeline.study: predict.py --study and the
web app), predict.py's test set (pipeline.batch: streamed from the test
DICOMs, or read from a test image cache, `cache`, one loop either way),
and through it the Kaggle kernel.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ich.cache import read_meta
from ich.config import PrepareConfig, cache_settings, prepare_config_from
from models.checkpoint import load_fold_model
from models.config import ExperimentCfg
from models.inference import forward, is_compiled, padded
from models.predict_split import InferenceError, check_cache, require_fold_checkpoints
from models.runtime import Runtime

from .decode import CachedSlices, Decoded, Decoder, InputSpec, SliceFile


@dataclass
class FoldModel:
    experiment: str
    k: int
    model: torch.nn.Module
    cfg: ExperimentCfg
    spec: InputSpec
    path: Path  # its checkpoint

    @property
    def key(self) -> tuple[str, int]:
        return self.experiment, self.k


def prepare_config_of(settings: dict, where: str) -> PrepareConfig:
    """A cache's image settings (ich.cache.image_settings) -> the prepare config that makes such images."""
    return prepare_config_from(cache_settings(settings), where, "engine")


class Sink:
    """Where stage one's results go, in row order: the decoded groups, then each fold model's outputs.

    This one keeps everything in memory (a study, a test split of the demo's
    size); pipeline.batch has one that streams embeddings to disk."""

    def __init__(self, keep_embeddings: bool = True):
        self.keep_embeddings = keep_embeddings
        self.groups: list[Decoded] = []
        self.seconds = {"prepare": 0.0, "stage one": 0.0}  # waiting for decoded groups; running the models
        self.probs: dict[tuple, list] = {}
        self.emb: dict[tuple, list] = {}

    def add_group(self, decoded: Decoded) -> None:
        self.groups.append(decoded)

    def add_outputs(self, key: tuple, probs: np.ndarray, emb: np.ndarray | None) -> None:
        self.probs.setdefault(key, []).append(probs)
        if self.keep_embeddings and emb is not None:
            self.emb.setdefault(key, []).append(emb)

    def slices(self) -> pd.DataFrame:
        """Every group's usable slices, in row order; cache_row = the row in the outputs (and images)."""
        tables = [g.slices for g in self.groups if len(g.slices)]
        if not tables:
            return pd.DataFrame(columns=["image_id", "series_id", "slice_index", "cache_row"])
        table = pd.concat(tables, ignore_index=True)
        table["cache_row"] = np.arange(len(table), dtype=np.int64)
        return table

    def rejected(self) -> pd.DataFrame:
        return pd.concat([g.rejected for g in self.groups], ignore_index=True) if self.groups else pd.DataFrame()

    def outputs(self) -> dict[tuple, tuple[np.ndarray, np.ndarray | None]]:
        """{(experiment, k): (probabilities n x 6, embeddings n x d float16 or None)}, rows as `slices()`."""
        return {key: (np.concatenate(p), np.concatenate(self.emb[key]) if key in self.emb else None)
                for key, p in self.probs.items()}


@dataclass
class Prediction:
    """A study's results (Engine.predict)."""
    slices: pd.DataFrame                 # usable slices in z-order (prepare_data's columns)
    rejected: pd.DataFrame               # the chosen files prepare_data would reject, with its reasons
    probs: pd.DataFrame                  # image_id + six stage-two probabilities, rows as slices
    stage_one: dict = field(default_factory=dict)  # (experiment, k) -> probabilities of fold model k
    images: np.ndarray | None = None     # n x H x W x windows uint8: the cache-like windows, rows as slices
    timings: dict = field(default_factory=dict)


class Engine:
    """Every fold model of a predict config's experiments (and its saved stage two), loaded once."""

    def __init__(self, cfg, model_dir: Path, runtime: Runtime, *, stage_two: bool = True, num_workers: int = 0,
                 batch_size: int | None = None, train_dir: Path | None = None, cache: CachedSlices | None = None):
        """cache: read the images from a prepared split's cache instead of decoding DICOMs (its image
        settings must be the checkpoints'); groups are then that cache's row groups (CachedSlices.groups)."""
        self.cfg, self.runtime, self.model_dir = cfg, runtime, Path(model_dir)
        self.batch_size = int(batch_size or cfg.batch_size)
        self.fold_models: list[FoldModel] = []
        settings = {}
        for exp in cfg.experiments:
            for k, path in require_fold_checkpoints(self.model_dir / exp).items():
                model, ecfg, info = load_fold_model(path, runtime)
                model.eval()
                if runtime.wants_compile(ecfg.train.compile):
                    model.compile_backbone()
                if info.get("image_settings"):
                    settings[str(path)] = info["image_settings"]
                spec = InputSpec(ecfg.input.mode, int(ecfg.input.adjacent_channel), int(ecfg.final_size))
                self.fold_models.append(FoldModel(exp, int(k), model, ecfg, spec, Path(path)))
        self.image_settings = self._common_settings(settings, train_dir)
        self.prepare_cfg = prepare_config_of(self.image_settings, "the checkpoints' image settings")
        self.stage_two = None
        if stage_two:
            from stacking.apply import SavedStageTwo
            self.stage_two = SavedStageTwo(cfg, self.model_dir)
            for exp in cfg.experiments:
                missing = set(self.stage_two.folds) - {f.k for f in self.fold_models if f.experiment == exp}
                if missing:
                    raise InferenceError(f"stage two {cfg.name} pairs fold models {sorted(missing)} of {exp} "
                                         f"that {self.model_dir / exp} lacks: rerun predict.py with this config")
        if cache is not None:
            check_cache(self.image_settings, cache.clean_dir)
        self.decoder = Decoder(self.prepare_cfg, [f.spec for f in self.fold_models], num_workers, cache)
        if num_workers:
            self.decoder.start()

    def _common_settings(self, found: dict, train_dir: Path | None) -> dict:
        """The one set of image settings every fold model was trained on (the checkpoints say it; older
        checkpoints without it: the train cache's)."""
        distinct = {repr(v): v for v in found.values()}
        if len(distinct) > 1:
            raise InferenceError("the fold models were trained on caches with different image settings ("
                                 + "; ".join(sorted(distinct)) + "): one engine needs one image setting")
        if distinct:
            return next(iter(distinct.values()))
        meta = read_meta(train_dir) if train_dir is not None else None
        if meta is None:
            raise InferenceError("the checkpoints do not say which image settings they were trained on and "
                                 f"there is no train cache meta ({train_dir}): retrain, or point "
                                 "TRAIN_DATA_CLEAN_PATH at the train cache")
        from ich.cache import image_settings
        return image_settings(meta)

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [f.key for f in self.fold_models]

    # --- stage one ------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_batch(self, inputs: dict[InputSpec, torch.Tensor], sink: Sink) -> None:
        """One batch (each spec's rows, the same slices) through every fold model, in the config's order."""
        rt = self.runtime
        on_device = {}
        for spec, x in inputs.items():
            x = x.to(rt.device, non_blocking=True)
            on_device[spec] = x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
        rows = len(next(iter(inputs.values())))
        queued = []
        for f in self.fold_models:  # every fold model's work is queued before the host waits for any
            x = on_device[f.spec]
            if is_compiled(f.model):
                x = padded(x, self.batch_size)  # a compiled model sees one batch shape only
            prob, emb = forward(f.model, x, rt, f.cfg.train.tta_hflip)
            queued.append((f.key, prob[:rows].float(), emb[:rows].float().half()))
        for key, prob, emb in queued:  # the first copy waits for the device once; the rest are ready
            sink.add_outputs(key, prob.cpu().numpy(), emb.cpu().numpy())

    def stage_one(self, groups, sink: Sink, *, keep_images: bool = False, progress=None) -> Sink:
        """Decode `groups` (lists of SliceFile, each whole series) and run every fold model on them.

        Batches are cut across groups, so every batch but the last is full.
        progress(n): called with the number of files of each group decoded.
        """
        return self._stage_one(iter(self.decoder(groups, keep_images)), sink, progress)

    def _stage_one(self, decoded_groups, sink: Sink, progress=None) -> Sink:
        pending: dict[InputSpec, list[torch.Tensor]] = {}
        n_pending = 0

        def take(n: int) -> dict[InputSpec, torch.Tensor]:
            out = {}
            for spec, parts in pending.items():
                whole = torch.cat(parts) if len(parts) > 1 else parts[0]
                out[spec], rest = whole[:n], whole[n:]
                pending[spec] = [rest]
            return out

        for f in self.fold_models:
            f.model.eval()
        while True:
            t = time.perf_counter()
            decoded = next(decoded_groups, None)
            sink.seconds["prepare"] += time.perf_counter() - t
            if decoded is None:
                break
            sink.add_group(decoded)
            if progress is not None:
                progress(len(decoded.slices) + len(decoded.rejected))
            if not len(decoded.slices):
                continue
            for spec, x in decoded.inputs.items():
                pending.setdefault(spec, []).append(x)
            n_pending += len(decoded.slices)
            t = time.perf_counter()
            while n_pending >= self.batch_size:
                self._run_batch(take(self.batch_size), sink)
                n_pending -= self.batch_size
            sink.seconds["stage one"] += time.perf_counter() - t
        t = time.perf_counter()
        if n_pending:
            self._run_batch(take(n_pending), sink)
        sink.seconds["stage one"] += time.perf_counter() - t
        return sink

    # --- a study: both stages -------------------------------------------------------------------
    def predict(self, files: list[SliceFile], *, keep_images: bool = False) -> Prediction:
        """Whole series (one study's chosen series, or any) -> stage-two probabilities per slice.

        Fold model k's outputs go through stage-two member k (its PCA, its
        boosters, its sequence member), then the saved blend: stacking.apply's
        function on in-memory outputs instead of files.
        """
        return self.predict_decoded(self.decoder([files], keep_images), keep_images=keep_images)

    def predict_decoded(self, decoded, *, keep_images: bool = False) -> Prediction:
        """`predict` on series decoded already (Decoded, e.g. pipeline.decode.decoded_from): the models only."""
        if self.stage_two is None:
            raise InferenceError("this engine was loaded without stage two (stage_two=False)")
        sink = self._stage_one(iter(decoded), Sink(keep_embeddings=bool(self.cfg.pca_width)))
        t1 = time.perf_counter()
        slices = sink.slices()
        outputs = sink.outputs()
        probs = None
        if len(slices):
            probs = self.stage_two.apply(slices, lambda k: self.stage_two.view(
                k, {exp: outputs[exp, k] for exp in self.cfg.experiments}))
        images = None
        if keep_images:
            kept = [g.images for g in sink.groups if g.images is not None and len(g.images)]
            images = torch.cat(kept).numpy() if kept else None
        return Prediction(slices, sink.rejected(), probs, {key: p for key, (p, _) in outputs.items()}, images,
                          {**sink.seconds, "stage two": time.perf_counter() - t1})

    def close(self) -> None:
        """Stop the decode workers."""
        loader = self.decoder._loader
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        loader._iterator = None

