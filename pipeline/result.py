"""One series of a study, predicted: the typed result every output, the SR and the web app read.

Made once by pipeline.study (`predict_study`, `study_result`); nothing adds
to it later (the web app keeps its Grad-CAM maps, thumbnails and series list
beside it, web.store). Its own module, without torch, so the outputs and a
DICOM node can name it without loading the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pydicom


@dataclass
class StudyResult:
    """One series of a study, predicted: what every output (pipeline.outputs), the SR and the web app read.

    Made once by `predict_study` / `study_result`; nothing adds to it later (the web app keeps its
    Grad-CAM maps and series list beside it, web.store)."""
    slices: pd.DataFrame      # file, image_id, slice_index, z, six probabilities; rows in z-order
    skipped: list[dict]       # {file, reason, detail} of every file not used, with its reason
    series: list[dict]        # {index, series_id, n_files, axial} of each CT series of the study
    series_id: str
    timings: dict[str, float]
    experiments: list[str]
    stage_two: str
    headers: list[pydicom.Dataset]  # per slice, table order: only pipeline.headers' fields
    images: np.ndarray | None = None  # n x H x W x windows uint8 (keep_images), rows as slices
    window_levels: list[dict] = field(default_factory=list)  # {name, center, width} of each window
    sources: list[bytes] | None = None  # the slices' files, for the viewer, within SOURCE_* (keep_images)

    @property
    def windows(self) -> list[str]:
        return [w["name"] for w in self.window_levels]

    @property
    def nbytes(self) -> int:
        """What this result holds in memory, roughly: images, kept files, per-slice rows and headers."""
        images = self.images.nbytes if self.images is not None else 0
        return images + sum(map(len, self.sources or ())) + 2048 * len(self.slices)
