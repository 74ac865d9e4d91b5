"""Results by id, in memory only, for the last few studies.

Nothing of a study touches the disk after its request (the upload's folder
is deleted when the request ends); the page still needs the result after the
upload returns (slices, windows, Grad-CAM maps, downloads), so the last
`max_studies` results stay in this process's memory under a random id, and
the oldest is dropped when a new one comes. `DELETE /api/studies/{id}`
forgets one at once; stopping the server forgets all.
"""
from __future__ import annotations

import secrets
import threading
from collections import OrderedDict


class StudyStore:
    def __init__(self, max_studies: int = 8):
        self.max_studies = max_studies
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, result: dict) -> str:
        study_id = secrets.token_urlsafe(12)  # random: says nothing of the patient, cannot be guessed
        with self._lock:
            self._items[study_id] = result
            while len(self._items) > self.max_studies:
                self._items.popitem(last=False)
        return study_id

    def get(self, study_id: str) -> dict | None:
        with self._lock:
            result = self._items.get(study_id)
            if result is not None:
                self._items.move_to_end(study_id)
            return result

    def forget(self, study_id: str) -> bool:
        with self._lock:
            return self._items.pop(study_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
