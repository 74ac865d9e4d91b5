"""The web application's model side: one study at a time through predict.py's study path, plus Grad-CAM.

`Engine.run` is `models.study.predict_study` (the batch path's prepare,
stage one and saved stage two; tests/test_study.py proves equal
probabilities) on files the web app has already read and sorted out
(`models.study.select_study`, outside this lock, with caps on time and
bytes), called under one lock: inference is CPU- or GPU-bound, so
running two at once only makes both slower and doubles the memory; later
requests queue on the lock, and beyond `max_waiting` they are told to come
back (HTTP 503) instead of piling up threads and memory.

Grad-CAM (`Engine.cam`) explains a slice with the first experiment's fold
models, each on the slice's network input exactly as stage one saw it
(models.data.SliceDataset over the study's cached windows, kept in memory),
through the report's Grad-CAM code (models.report.gradcam); the map shown is
the mean over the fold models, since every fold model's probability enters
the result. The models are loaded once, at start-up (which also pays
torch's and timm's one-off start costs before the first upload), and kept;
they have their own lock, so looking at maps does not wait for an upload's
inference.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ich.labels import LABELS
from ich.study import StudyError
from models import runtime as rt
from models.predict_split import InferenceError, fold_checkpoints
from models.study import model_info, predict_study


class Busy(RuntimeError):
    """Too many requests already wait for the model."""


class Engine:
    def __init__(self, settings, cfg, *, max_waiting: int = 16, work_dir: Path | None = None):
        self.settings, self.cfg, self.max_waiting, self.work_dir = settings, cfg, max_waiting, work_dir
        for exp in cfg.experiments:  # fail at start-up, not on the first upload
            if not fold_checkpoints(settings.model_checkpoint_dir / exp):
                raise InferenceError(f"no fold checkpoints in {settings.model_checkpoint_dir / exp}: "
                                     f"run train.py for {exp} first")
        saved = settings.model_checkpoint_dir / "stacking" / cfg.name
        if not saved.is_dir():
            raise InferenceError(f"no saved stage two in {saved}: run predict.py --config with this config first")
        self.model = model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir)
        self.runtime = rt.setup(cfg.amp, True)
        self._lock, self._cam_lock, self._count_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._waiting = 0
        self._cam_models = self._load_cam_models()  # also warms torch/timm up: the first upload is not slower

    def check_room(self) -> None:
        """Busy when the queue is full already: said before an upload is read, and again in `run`."""
        if self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} studies are already waiting for the model: try again in a minute")

    def run(self, study, series_index: int | None = None, *, work_dir: Path | None = None) -> dict:
        """One study (ich.study.StudyFiles, or what predict_study takes) -> predict_study's result with the
        slices' windows; raises Busy when the queue is full. work_dir: where its temporary folder goes (the
        request's own folder, so that a crash leaves nothing the next start does not sweep)."""
        with self._count_lock:
            if self._waiting >= self.max_waiting:
                raise Busy(f"{self._waiting} studies are already waiting for the model: try again in a minute")
            self._waiting += 1
        try:
            t = time.time()
            with self._lock:
                queued = time.time() - t
                result = predict_study(study, self.cfg, train_dir=self.settings.train_clean_dir,
                                       model_dir=self.settings.model_checkpoint_dir, runtime=self.runtime,
                                       series_index=series_index, keep_images=True, log=lambda *a: None,
                                       work_dir=work_dir or self.work_dir)
        finally:
            with self._count_lock:
                self._waiting -= 1
        result["timings"] = {"queue": queued, **result["timings"]}
        return result

    # --- Grad-CAM -------------------------------------------------------------------------------
    def _load_cam_models(self):
        from models.predict_split import load_fold_model
        from models.gradcam import target_layer

        exp = self.cfg.experiments[0]
        models = []
        for path in fold_checkpoints(self.settings.model_checkpoint_dir / exp).values():
            model, cfg, _ = load_fold_model(path, self.runtime)
            model = model.float().eval()
            models.append((model, target_layer(model, cfg.final_size), cfg))
        return models

    def cam(self, result: dict, row: int, label: str) -> np.ndarray:
        """H x W Grad-CAM in [0, 1] of one slice for one label, at the cached image's size; cached per study."""
        if label not in LABELS:
            raise StudyError(f"unknown label {label!r}: one of {', '.join(LABELS)}")
        if not 0 <= row < len(result["slices"]):
            raise StudyError(f"slice {row} does not exist: the series has {len(result['slices'])} slices")
        cams = result.setdefault("cams", {})
        if (row, label) in cams:
            return cams[row, label]
        import cv2

        from models.data import SliceDataset, with_neighbors
        from models.gradcam import cam_for

        with self._cam_lock:
            if self._cam_models is None:
                self._cam_models = self._load_cam_models()
            images = result["images"]
            table = with_neighbors(pd.DataFrame({"series_id": 0, "slice_index": np.arange(len(images)),
                                                 "cache_row": np.arange(len(images))}))
            maps = []
            for model, layer, cfg in self._cam_models:
                dataset = SliceDataset(table, "(in memory)", mode=cfg.input.mode, channel=cfg.input.adjacent_channel,
                                       size=cfg.final_size)
                dataset._images = images  # the study's cached windows, in memory: nothing on disk
                maps.append(cam_for(model, layer, dataset.image(row), LABELS.index(label)))
        size = images.shape[1]
        cam = cv2.resize(np.mean(maps, axis=0).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        cams[row, label] = np.clip(cam, 0, 1)
        return cams[row, label]

    def close(self) -> None:
        rt.teardown()


def load_engine(settings_path: str | Path, config_path: str | Path, **kwargs) -> Engine:
    from ich.settings import load_settings
    from stacking.config import load_predict_config

    return Engine(load_settings(settings_path), load_predict_config(config_path), **kwargs)
