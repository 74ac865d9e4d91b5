"""The five hemorrhage subtypes as 3-D lesions of a :class:`HeadPhantom`.

Each lesion draws its parameters once (from the series' RNG) and then answers
``mask(frame)`` for any chunk of slices, so it spans neighbouring slices the
way real bleeds do and the per-slice labels follow from the same mask that
paints the blood. Shapes follow where and how each subtype occurs:

- epidural: a biconvex lens against the inner skull (thick, short arc);
- subdural: a crescent along the inner skull of one hemisphere (thin, long);
- subarachnoid: blood in the sulci of one sector and/or the interhemispheric
  fissure (lines, widened to 4-6.5 mm so they survive 64-px downsampling);
- intraparenchymal: an irregular blob inside the brain with an oedema rim;
- intraventricular: blood layering in the dependent (posterior) part of one
  or both lateral ventricles.

Blood is 55-88 HU before noise, 25-55 HU above the parenchyma: bright in
the brain window and large enough (>= ~100 mm^2 at the lesion's centre) for a
CNN to see at 64-128 px.
"""
from __future__ import annotations

import numpy as np

# A slice counts as positive for a subtype when its lesion covers at least this
# area (and this many pixels): ~20 px at 256 px, 2 px at 64 px. Smaller tails of
# a lesion are painted but not labelled, like a reader missing a speck.
MIN_LESION_AREA_MM2 = 16.0
MIN_LESION_PIXELS = 2


def _angdiff(a, b):
    return (a - b + np.pi) % (2 * np.pi) - np.pi


class Lesion:
    """Base class: ``mask`` where the blood is, ``paint`` it into the tissue HU."""

    subtype = ""
    hu_range = (60.0, 85.0)

    def __init__(self, rng: np.random.Generator, head) -> None:
        self.hu = float(rng.uniform(*self.hu_range))
        self._draw(rng, head)

    @property
    def w_range(self) -> tuple[float, float]:
        """Heights (mm) outside which the mask is empty: the renderer skips those slices."""
        return self.wc - self.hz, self.wc + self.hz

    def _draw(self, rng, head) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask(self, f) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def paint(self, tissue: np.ndarray, mask: np.ndarray, f) -> np.ndarray:
        return np.where(mask, np.float32(self.hu), tissue)


def _side_angle(rng) -> float:
    """0 (patient's left, +x) or pi (right): lateral convexities bleed most."""
    return 0.0 if rng.random() < 0.5 else np.pi


class _Extradural(Lesion):
    """Blood between skull and brain: thickness over (arc angle, height) decides the shape."""

    def _taper(self, F):  # thickness profile in [0, 1] over the footprint F in [0, 1)
        raise NotImplementedError

    def mask(self, f):
        dw = (f.w - self.wc) / self.hz
        ang = _angdiff(f.phi, self.theta) / self.alpha
        F = ang * ang + dw * dw
        thick = self.tmax * self._taper(np.clip(F, 0, 1))
        m = (F < 1) & f.brain & (-f.d < thick)
        if self.midline:  # stays in its hemisphere (the falx stops it)
            m &= np.cos(self.side) * f.x > 2.5
        return m


class Epidural(_Extradural):
    subtype = "epidural"
    hu_range = (62.0, 85.0)
    midline = False

    def _draw(self, rng, head):
        s = head.scale
        self.side = _side_angle(rng)
        self.theta = self.side + rng.uniform(-1.0, 1.0)
        self.alpha = rng.uniform(0.40, 0.65)
        self.hz = rng.uniform(12, 20) * s
        self.tmax = rng.uniform(12, 20) * s
        self.wc = head.height_mm(rng.uniform(0.35, 0.70))

    def _taper(self, F):
        return 1.0 - F  # lens: both faces convex


class Subdural(_Extradural):
    subtype = "subdural"
    hu_range = (60.0, 82.0)
    midline = True

    def _draw(self, rng, head):
        s = head.scale
        self.side = _side_angle(rng)
        self.theta = self.side + rng.uniform(-0.35, 0.35)
        self.alpha = rng.uniform(0.9, 1.3)
        self.hz = rng.uniform(22, 40) * s
        self.tmax = rng.uniform(7, 12) * s
        self.wc = head.height_mm(rng.uniform(0.40, 0.70))

    def _taper(self, F):
        return np.sqrt(1.0 - F)  # crescent: flat along the skull, thin tapering ends


class Subarachnoid(Lesion):
    subtype = "subarachnoid"
    hu_range = (62.0, 80.0)

    def _draw(self, rng, head):
        s = head.scale
        self.theta = rng.uniform(0, 2 * np.pi)
        self.half = rng.uniform(0.35, 0.70)
        self.hz = rng.uniform(15, 30) * s
        self.wc = head.height_mm(rng.uniform(0.40, 0.75))
        self.width = rng.uniform(4.5, 6.5)
        self.sulcal = rng.random() < 0.8
        self.fissure = (not self.sulcal) or rng.random() < 0.4
        self.f_half = rng.uniform(2.5, 3.5)
        self.f_y = rng.uniform(-0.4, 0.4) * head.b_in
        self.f_ly = rng.uniform(20, 45) * s
        self.f_hz = rng.uniform(12, 25) * s
        self.f_wc = head.height_mm(rng.uniform(0.50, 0.80))

    @property
    def w_range(self):
        lo, hi = np.inf, -np.inf
        if self.sulcal:
            lo, hi = self.wc - self.hz, self.wc + self.hz
        if self.fissure:
            lo, hi = min(lo, self.f_wc - self.f_hz), max(hi, self.f_wc + self.f_hz)
        return lo, hi

    def mask(self, f):
        m = np.zeros(f.d.shape, bool)
        if self.sulcal:
            dw = (f.w - self.wc) / self.hz
            reach = self.half * np.sqrt(np.clip(1 - dw * dw, 0, 1))
            m |= (f.sulcus_arc < self.width / 2) & (-f.d < f.sulcus_depth + 2.0) \
                & (np.abs(_angdiff(f.phi, self.theta)) < reach) & f.brain
        if self.fissure:
            dw = (f.w - self.f_wc) / self.f_hz
            ly = self.f_ly * np.sqrt(np.clip(1 - dw * dw, 0, 1))
            m |= (np.abs(f.x) < self.f_half) & (np.abs(f.y - self.f_y) < ly) & f.brain & (-f.d > 1.0)
        return m


class Intraparenchymal(Lesion):
    subtype = "intraparenchymal"
    hu_range = (62.0, 88.0)
    oedema_hu = -7.0

    def _draw(self, rng, head):
        s = head.scale
        u = rng.uniform(0.30, 0.70)
        p = float(head.profile(u))
        frac, ang = rng.uniform(0.1, 0.55), rng.uniform(0, 2 * np.pi)
        self.xc = frac * head.a_in * p * np.cos(ang)
        self.yc = frac * head.b_in * p * np.sin(ang)
        self.wc = head.height_mm(u)
        r = rng.uniform(8, 17) * s
        self.rx, self.ry = r * rng.uniform(0.8, 1.2, 2)
        self.hz = rng.uniform(10, 18) * s
        self.wobble = (rng.uniform(0.05, 0.15), int(rng.integers(2, 5)), rng.uniform(0, 2 * np.pi))

    @property
    def w_range(self):
        return self.wc - 1.35 * self.hz, self.wc + 1.35 * self.hz  # blob + oedema rim

    def _q(self, f):
        dx, dy, dw = f.x - self.xc, f.y - self.yc, (f.w - self.wc) / self.hz
        amp, lobes, ph = self.wobble
        rho = np.sqrt((dx / self.rx) ** 2 + (dy / self.ry) ** 2) * (1 + amp * np.sin(lobes * np.arctan2(dy, dx) + ph))
        return np.sqrt(rho * rho + dw * dw)

    def _parenchyma(self, f):
        return f.brain & ~f.ventricles[0] & ~f.ventricles[1] & (-f.d > 2.0)

    def mask(self, f):
        return (self._q(f) < 1) & self._parenchyma(f)

    def paint(self, tissue, mask, f):
        q = self._q(f)
        rim = (q >= 1) & (q < 1.35) & self._parenchyma(f)
        tissue = np.where(rim, tissue + np.float32(self.oedema_hu), tissue)
        return np.where(mask, np.float32(self.hu), tissue)


class Intraventricular(Lesion):
    subtype = "intraventricular"
    hu_range = (56.0, 75.0)

    def _draw(self, rng, head):
        v = head.vent
        self.sides = [(0,), (1,), (0, 1)][int(rng.choice(3, p=[0.3, 0.3, 0.4]))]
        self.level = v["y"] + rng.uniform(-0.4, 0.3) * v["ry"]  # fluid level; blood sinks posteriorly
        self.wc, self.hz = head.height_mm(v["u"]), v["hu"] * head.height

    def mask(self, f):
        vent = f.ventricles[self.sides[0]]
        if len(self.sides) == 2:
            vent = vent | f.ventricles[1]
        return vent & (f.y > self.level)


LESION_TYPES = {cls.subtype: cls for cls in (Epidural, Intraparenchymal, Intraventricular, Subarachnoid, Subdural)}
