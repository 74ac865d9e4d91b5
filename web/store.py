"""Results by id, in memory only, for the last few studies, within one byte budget.

Nothing of a study touches the disk after its request (the upload's folder
is deleted when the request ends); the page still needs the result after the
upload returns (slices, windows, Grad-CAM maps, downloads), so the last
`max_studies` uploads stay in this process's memory under a random id, and
the oldest is dropped when a new one comes. All of them together stay within
`max_bytes` (images, the files kept for the viewer, Grad-CAM maps): over it,
the oldest results lose their kept files first (the viewer falls back to the
network's windows), then whole results go, the newest last.
`DELETE /api/studies/{id}` forgets one at once; stopping the server forgets all.
"""
from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from pipeline.result import StudyResult

from .heap import give_back

CAMS_KEPT = 64  # Grad-CAM maps (PNG bytes) kept per upload; the page asks for one slice and label at a time


@dataclass
class StoredStudy:
    """One upload: its series list, a StudyResult per series it predicted, and what the viewer made of it."""
    results: dict[int, StudyResult]  # by series index
    series: list[dict]               # every CT series: index, series_id, n_files, axial, usable, reason, ...
    chosen: int
    timings: dict[str, float]
    thumbnails: dict[int, bytes] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    cams: OrderedDict = field(default_factory=OrderedDict)  # (series, row, label) -> PNG bytes, CAMS_KEPT at most

    def result(self, series: int | None = None) -> StudyResult | None:
        return self.results.get(self.chosen if series is None else series)

    def cam(self, key, make) -> bytes:
        """The PNG of a Grad-CAM map, made by make() once, kept among the last CAMS_KEPT."""
        if key in self.cams:
            self.cams.move_to_end(key)
            return self.cams[key]
        png = make()
        self.cams[key] = png
        while len(self.cams) > CAMS_KEPT:
            self.cams.popitem(last=False)
        return png

    @property
    def nbytes(self) -> int:
        return (sum(r.nbytes for r in self.results.values()) + sum(map(len, self.thumbnails.values()))
                + sum(map(len, self.cams.values())))

    def drop_sources(self) -> bool:
        """Forget the files kept for the viewer; -> whether there were any."""
        kept = [i for i, r in self.results.items() if r.sources]
        for i in kept:
            self.results[i] = dataclasses.replace(self.results[i], sources=None)
        return bool(kept)


def stored_study(result: StudyResult) -> StoredStudy:
    """One series predicted outside an upload (a DICOM node's, dicom_node.py --web-port), kept as an upload is:
    its study's CT series listed, this one chosen and the only one with a result."""
    series = [{**s, "description": None, "usable": s["series_id"] == result.series_id,
               "reason": None if s["series_id"] == result.series_id else "not sent as this series"}
              for s in result.series]
    chosen = next(s["index"] for s in series if s["usable"])
    return StoredStudy(results={chosen: result}, series=series, chosen=chosen, timings={})


class StudyStore:
    def __init__(self, max_studies: int = 8, max_bytes: int | None = None):
        self.max_studies, self.max_bytes = max_studies, max_bytes
        self._items: OrderedDict[str, StoredStudy] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, study: StoredStudy) -> str:
        study_id = secrets.token_urlsafe(12)  # random: says nothing of the patient, cannot be guessed
        with self._lock:
            self._items[study_id] = study
            n = len(self._items)
            while len(self._items) > self.max_studies:
                self._items.popitem(last=False)
            self._fit()
            dropped = n - len(self._items)
        if dropped:
            give_back()
        return study_id

    def _fit(self) -> None:
        """Within max_bytes: the oldest results' viewer files go first, then the oldest results."""
        if self.max_bytes is None:
            return
        for item in list(self._items.values()):
            if self.nbytes <= self.max_bytes:
                return
            item.drop_sources()
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    def fit(self) -> None:
        with self._lock:
            self._fit()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in list(self._items.values()))

    def get(self, study_id: str) -> StoredStudy | None:
        with self._lock:
            study = self._items.get(study_id)
            if study is not None:
                self._items.move_to_end(study_id)
            return study

    def forget(self, study_id: str) -> bool:
        with self._lock:
            gone = self._items.pop(study_id, None) is not None
        if gone:
            give_back()
        return gone

    def __len__(self) -> int:
        return len(self._items)
