"""Plan a synthetic dataset: patients, studies, series, IDs, scanner settings, bleeds.

Everything random about the dataset *as a whole* is drawn here, in one pass
from the master seed, so that IDs are unique across the dataset and the
"every subtype has positives" guarantee can be enforced before any pixel is
made. Everything random *inside* a series (anatomy, lesion shapes, noise) is
drawn later from the series' own seed ``(seed, index)``, which keeps the
output byte-identical whatever ``n_jobs`` is.

Proportions follow the real data where known: mostly one study per patient,
one axial series per study, 20-60 slices 4-6 mm apart, a share of series with
gantry tilt, some stored feet-first (z decreasing with height), ~12 % of files
with the broken 12-bit encoding, -2000 padding in most 16-bit series, and
window tags that are sometimes multi-valued.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ich.labels import SUBTYPES

# Series-level bleed model. Per split, a quota of "bleed" series is drawn
# (stochastic rounding of BLEED_SERIES_SHARE * n_series), then each subtype
# goes to a quota of those (SUBTYPE_GIVEN_BLEED). Quotas rather than
# independent coin flips keep even a 40-series dataset near the target
# per-slice prevalences of the real stage-2 train set: any ~14 %, epidural
# ~0.7 %, subdural ~5.5 %, intraparenchymal ~4.5 %, subarachnoid ~4.5 %,
# intraventricular ~3 %. Concentrating subtypes in the same series gives the
# real data's overlap (sum of subtypes ~1.4x any). Tuned by simulation.
BLEED_SERIES_SHARE = 0.46
SUBTYPE_GIVEN_BLEED = {
    "epidural": 0.082,
    "intraparenchymal": 0.55,
    "intraventricular": 0.30,
    "subarachnoid": 0.32,
    "subdural": 0.30,
}
SECOND_LESION_P = 0.2  # another lesion of the same subtype (bilateral SDH, two IPH ...)
BITS12_FILE_SHARE = 0.13
TILT_P, DESCENDING_P, PADDING_P, LIST_WINDOW_P = 0.3, 0.15, 0.8, 0.2


@dataclass(frozen=True)
class SeriesPlan:
    """One axial series: identity, geometry, encoding and the bleeds it holds."""

    split: str                 # "train" or "test"
    index: int                 # global series number; with the master seed, seeds the series
    seed: int
    patient_id: str
    study_id: str
    series_id: str
    sop_ids: tuple             # one per slice, inferior -> superior
    image_size: int
    pixel_spacing: float       # mm
    slice_spacing: float       # mm, constant within the series
    tilt_deg: float            # gantry tilt, 0 for none
    descending: bool           # z decreases from skull base to vertex (feet-first storage)
    table: tuple               # (y, z) offset of the first slice's centre, mm
    bits12: bool
    padding: bool
    intercept: float
    window_center: object      # number or list
    window_width: object
    subtypes: tuple            # lesions to draw (a subtype may repeat)

    @property
    def n_slices(self) -> int:
        return len(self.sop_ids)

    @property
    def orientation(self) -> tuple:
        t = math.radians(self.tilt_deg)
        return (1.0, 0.0, 0.0, 0.0, round(math.cos(t), 6), round(-math.sin(t), 6))

    @property
    def normal(self) -> np.ndarray:
        o = np.array(self.orientation)
        return np.cross(o[:3], o[3:])

    def position(self, k: int) -> tuple:
        """ImagePositionPatient of slice k: first pixel's corner, moved along the normal."""
        o = np.array(self.orientation)
        half = self.image_size * self.pixel_spacing / 2
        y0, z0 = self.table
        step = (-1.0 if self.descending else 1.0) * k * self.slice_spacing
        p = np.array([0.0, y0, 0.0]) - half * o[:3] - half * o[3:] + (z0 + step) * self.normal
        return tuple(float(v) for v in np.round(p, 3))


def _hex_ids(rng, n: int, digits: int, taken: set) -> list:
    out = []
    while len(out) < n:
        v = "ID_" + format(int(rng.integers(0, 16 ** digits)), f"0{digits}x")
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _window(rng):
    center = float(rng.choice([30, 35, 36, 40, 40, 40, 50]))
    width = float(rng.choice([80, 80, 80, 80, 100, 150]))
    if rng.random() < LIST_WINDOW_P:
        return [center, center], [width, width]
    return center, width


def _stochastic_round(rng, x: float) -> int:
    """floor(x) plus one with probability frac(x): the right count on average, little spread."""
    return int(np.floor(x)) + int(rng.random() < x - np.floor(x))


def _assign_subtypes(rng, n_series: int) -> list:
    """Per series, the list of lesions to draw (quotas; see BLEED_SERIES_SHARE)."""
    out = [[] for _ in range(n_series)]
    n_bleed = min(n_series, _stochastic_round(rng, BLEED_SERIES_SHARE * n_series))
    bleed = rng.choice(n_series, size=n_bleed, replace=False)
    for subtype in SUBTYPES:
        m = min(n_bleed, _stochastic_round(rng, SUBTYPE_GIVEN_BLEED[subtype] * n_bleed))
        for i in sorted(rng.choice(bleed, size=m, replace=False)):
            out[i].append(subtype)
            if subtype != "epidural" and rng.random() < SECOND_LESION_P:
                out[i].append(subtype)
    return out


def _force_subtypes(rng, patients: list) -> None:
    """Make every subtype appear in a few series of distinct patients of the split.

    Downstream tests fit one model per label and split by patient; a label
    with no positive at all would make them meaningless. ``patients`` is a
    list of lists of per-series subtype lists, modified in place.
    """
    if not patients:
        return
    need = 2 if len(patients) >= 10 else 1
    for subtype in SUBTYPES:
        have = sum(any(subtype in s for s in series) for series in patients)
        lacking = [i for i, series in enumerate(patients) if not any(subtype in s for s in series)]
        rng.shuffle(lacking)
        for i in lacking[: max(0, need - have)]:
            series = patients[i]
            series[int(rng.integers(len(series)))].append(subtype)


def _bits12_flags(rng, n_slices: list) -> list:
    """Pick whole series (the quirk is per scanner) up to ~12 % of the split's files.

    A split of two or more series always gets one, so tiny test datasets
    exercise the fix too.
    """
    flags = [False] * len(n_slices)
    total, got = sum(n_slices), 0
    for i in rng.permutation(len(n_slices)):
        if (got == 0 and len(n_slices) >= 2) or got + n_slices[i] <= BITS12_FILE_SHARE * total:
            flags[i], got = True, got + n_slices[i]
    return flags


def plan_dataset(*, n_train_patients: int, n_test_patients: int, image_size: int, seed: int,
                 min_slices: int = 20) -> list:
    """All series of the dataset, train first, in a deterministic order.

    min_slices: the shortest series (20, as in the real data, by default;
    longer for a dataset of long series: between min_slices and
    max(60, min_slices) slices, the spacing unchanged).
    """
    rng = np.random.default_rng([seed, 0x5EED])
    taken: set = set()
    plans, index = [], 0
    for split, n_patients in (("train", n_train_patients), ("test", n_test_patients)):
        n_studies = rng.choice([1, 2, 3], size=n_patients, p=[0.8, 0.17, 0.03])
        flat = iter(_assign_subtypes(rng, int(n_studies.sum())))
        bleeds = [[next(flat) for _ in range(k)] for k in n_studies]
        _force_subtypes(rng, bleeds)
        geometry = []
        for n_st in n_studies:
            for _ in range(n_st):
                dz = round(float(rng.uniform(4.0, 6.0)), 1)
                extent = rng.uniform(110, 230)
                geometry.append((dz, int(np.clip(round(extent / dz) + 1, min_slices, max(60, min_slices)))))
        bits12 = _bits12_flags(rng, [n for _, n in geometry])
        g = 0
        for n_st, series_bleeds in zip(n_studies, bleeds):
            (patient_id,) = _hex_ids(rng, 1, 8, taken)
            for st in range(n_st):
                dz, n = geometry[g]
                ps = round(float(rng.uniform(0.40, 0.50)) * 512 / image_size, 6)
                center, width = _window(rng)
                quirk = bits12[g]
                plans.append(SeriesPlan(
                    split=split, index=index, seed=seed,
                    patient_id=patient_id,
                    study_id=_hex_ids(rng, 1, 10, taken)[0],
                    series_id=_hex_ids(rng, 1, 10, taken)[0],
                    sop_ids=tuple(_hex_ids(rng, n, 9, taken)),
                    image_size=image_size, pixel_spacing=ps, slice_spacing=dz,
                    tilt_deg=round(float(rng.uniform(10, 27)), 2) if rng.random() < TILT_P else 0.0,
                    descending=bool(rng.random() < DESCENDING_P),
                    table=(round(float(rng.uniform(-15, 30)), 1), round(float(rng.uniform(-60, 160)), 1)),
                    bits12=quirk,
                    padding=(not quirk) and bool(rng.random() < PADDING_P),
                    intercept=-1000.0 if rng.random() < 0.1 else -1024.0,
                    window_center=center, window_width=width,
                    subtypes=tuple(series_bleeds[st]),
                ))
                index += 1
                g += 1
    return plans
