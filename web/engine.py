"""The web application's model side: one in-memory engine (pipeline.engine) on one thread, plus Grad-CAM.

Built once when the server starts (`load_engine`, from the app's lifespan):
every fold model of the predict config and the saved stage two are loaded
and torch warmed up, so an upload pays none of it. An upload's files are
read and decoded in a process of its own (web.reader); `WebEngine.run`
then runs only the models, on each decoded series (`Engine.predict_decoded`:
the batch path's stage one and stage two, in memory; tests/test_study.py
proves equal probabilities), one at a time: inference is CPU- or
GPU-bound, so running two at once only makes both slower and doubles the
memory; later requests queue for its thread, and beyond `max_waiting` they are
told to come back (HTTP 503) instead of piling up threads and memory.

The models run on two threads of their own, always the same ones: one for
the uploads' inference, one for Grad-CAM. Why (measured, BENCHMARKS.md's
hostile section, session 10): torch keeps state per thread that runs a model
(its OpenMP team, oneDNN's scratch memory), and the server's thread pool
has up to 40 threads; a Grad-CAM flood on it grew the server's live heap
by 26 MB and its fragmented free heap by 46 MB over four rounds whose
results were deleted. On one thread, that state is built once.

Grad-CAM (`WebEngine.cam`) explains a slice with the first experiment's
fold models (the engine's own, in float32 copies), each on the slice's
network input exactly as stage one saw it (models.data.SliceDataset over
the study's windows, kept in memory), through models.gradcam; the map
shown is the mean over the fold models, since every fold model's
probability enters the result. It has its own thread, so looking at maps
does not wait for an upload's inference; its maps are kept by the store
(web.store), bounded, not in the result.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ich.labels import LABELS
from ich.study import StudyError
from models import runtime as rt
from pipeline.decode import decoded_from
from pipeline.engine import Engine
from pipeline.result import StudyResult
from pipeline.study import model_info, predict_study, study_result

from .reader import UploadRead


class Busy(RuntimeError):
    """Too many requests already wait for the model."""


class WebEngine:
    def __init__(self, settings, cfg, *, max_waiting: int = 16):
        self.settings, self.cfg, self.max_waiting = settings, cfg, max_waiting
        self.runtime = rt.setup(cfg.amp, True)
        # no decode workers here: an upload is read and decoded in its own process (web.reader)
        self.engine = Engine(cfg, settings.model_checkpoint_dir, self.runtime, num_workers=0,
                             train_dir=settings.train_clean_dir)
        self.model = model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir)
        # every upload's inference on one thread, every Grad-CAM on another (module docstring)
        self._models = ThreadPoolExecutor(1, thread_name_prefix="ich-models")
        self._cams = ThreadPoolExecutor(1, thread_name_prefix="ich-gradcam")
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._cam_models = self._load_cam_models()

    @property
    def prepare_cfg(self):
        """The image settings every fold model was trained on: what the reading processes decode with."""
        return self.engine.prepare_cfg

    def check_room(self) -> None:
        """Busy when the queue is full already: said before an upload is read, and again in `run`."""
        if self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} studies are already waiting for the model: try again in a minute")

    def run(self, read: UploadRead) -> dict[int, StudyResult]:
        """Each decoded series of an upload (web.reader) through the models -> {series index: StudyResult},
        the chosen series first; a series whose slices all failed is left out. Busy when the queue is full."""
        specs = [f.spec for f in self.engine.fold_models]
        decoded = [(s, decoded_from(s.images, s.slices, s.rejected, specs, keep=True)) for s in read.decoded]
        with self._count_lock:
            if self._waiting >= self.max_waiting:
                raise Busy(f"{self._waiting} studies are already waiting for the model: try again in a minute")
            self._waiting += 1
        t = time.time()

        def predict():
            return time.time() - t, [(s, self.engine.predict_decoded([d], keep_images=True)) for s, d in decoded]
        try:
            queued, preds = self._models.submit(predict).result()
        finally:
            with self._count_lock:
                self._waiting -= 1
        out = {}
        for s, pred in preds:
            if not len(pred.slices) and s.index != read.chosen:
                continue
            out[s.index] = study_result(s.files, pred, self.engine, keep_images=True, headers=s.headers,
                                        timings={"queue": queued, "read": read.seconds})
        return out

    def predict_files(self, files) -> StudyResult:
        """Files already sorted out (ich.study.StudyFiles: a DICOM node's series, dicom_node.py --web-port)
        through the models on the uploads' thread, keeping what the viewer needs."""
        return self._models.submit(predict_study, files, self.engine, keep_images=True,
                                   log=lambda *a: None).result()

    # --- Grad-CAM -------------------------------------------------------------------------------
    def _load_cam_models(self):
        """The first experiment's fold models, loaded once more from the checkpoints the engine loaded, in
        float32 and never compiled (Grad-CAM hooks a layer and needs gradients in full precision). Their
        parameters ask for no gradient: a map needs the layer's gradients only (models.gradcam.cam_for
        asks them of the input), and parameter gradients, once made, stayed allocated (the models' size in
        float32) after every result was gone."""
        from models.gradcam import target_layer
        from models.checkpoint import load_fold_model

        exp = self.cfg.experiments[0]
        models = []
        for f in self.engine.fold_models:
            if f.experiment == exp:
                model, cfg, _ = load_fold_model(f.path, self.runtime)
                model = model.float().eval().requires_grad_(False)
                models.append((model, target_layer(model, cfg.final_size), cfg))
        return models

    def cam(self, result: StudyResult, row: int, label: str) -> np.ndarray:
        """H x W Grad-CAM in [0, 1] of one slice for one label, at the cached image's size."""
        if label not in LABELS:
            raise StudyError(f"unknown label {label!r}: one of {', '.join(LABELS)}")
        if not 0 <= row < len(result.slices):
            raise StudyError(f"slice {row} does not exist: the series has {len(result.slices)} slices")
        return self._cams.submit(self._cam, result, row, label).result()

    def _cam(self, result: StudyResult, row: int, label: str) -> np.ndarray:
        """`cam`, on the Grad-CAM thread (one map at a time)."""
        import cv2

        from models.data import SliceDataset, with_neighbors
        from models.gradcam import cam_for

        if self._cam_models is None:
            self._cam_models = self._load_cam_models()
        images = result.images
        table = with_neighbors(pd.DataFrame({"series_id": 0, "slice_index": np.arange(len(images)),
                                             "cache_row": np.arange(len(images))}))
        maps = []
        for model, layer, cfg in self._cam_models:
            dataset = SliceDataset(table, None, mode=cfg.input.mode, channel=cfg.input.adjacent_channel,
                                   size=cfg.final_size, images=images)  # the study's windows, in memory
            maps.append(cam_for(model, layer, dataset.image(row), LABELS.index(label)))
        size = images.shape[1]
        cam = cv2.resize(np.mean(maps, axis=0).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        return np.clip(cam, 0, 1)

    def close(self) -> None:
        for thread in (self._models, self._cams):
            thread.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
        rt.teardown()


def load_engine(settings_path: str | Path, config_path: str | Path, **kwargs) -> WebEngine:
    from ich.settings import load_settings
    from stacking.config import load_predict_config

    return WebEngine(load_settings(settings_path), load_predict_config(config_path), **kwargs)
