"""A head-CT phantom per series, rendered slice-chunk by slice-chunk with numpy.

Why a phantom at all: the real images cannot be downloaded here, yet the
pipeline (windowing, brain-fraction checks, CNNs, neighbour-slice stacking)
must meet images that behave like head CT: air at -1000 HU, a bright skull
ring, scalp at ~40 HU, brain at 25-40 HU with CSF spaces, and hemorrhages at
50-90 HU that span neighbouring slices.

Geometry. Everything lives in the scanner's slice frame: ``x`` (mm, columns,
left-right), ``y`` (mm, rows, anterior -> posterior) and ``w`` (mm along the
slice normal, 0 at the first, most inferior slice). The inner skull surface of
slice ``w`` is an ellipse with semi-axes ``a(u), b(u)`` that grow then shrink
with the normalised height ``u`` (0 at the skull base, ~1 at the vertex). The
signed distance to that ellipse (first-order approximation, negative inside)
drives the layers: scalp, skull (dense tables, lighter diploe), a thin CSF rim,
cortical grey matter, white matter; radial sulci, the interhemispheric
fissure and the lateral and third ventricles are CSF; the lowest slices get
petrous ridges and an air sinus.

Noise is Gaussian, 5-8 HU per pixel at the native 512 px and scaled by
size/512 below it: a 64-px image stands for a downsampled real one, whose
pixels average many native pixels (so lesions stay learnable at 64-128 px).

Rendering is vectorised over a chunk of slices at once (a few MB per chunk),
so a 512x512x60 series never needs its whole volume in memory, and the
output does not depend on the chunk size (noise is drawn slice by slice).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lesions import LESION_TYPES, MIN_LESION_AREA_MM2, MIN_LESION_PIXELS

AIR_HU = -1000.0
SCALP_HU = 40.0
CSF_HU = 6.0
NATIVE_SIZE = 512  # the real images' rows/columns


def soft_inside(dist: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fraction of a pixel inside a surface (dist < 0 inside): a one-pixel linear ramp.

    Partial volume keeps thin structures (skull, sulci) from aliasing at 64 px.
    """
    return np.clip(0.5 - dist / pixel_mm, 0.0, 1.0, dtype=np.float32)


@dataclass
class Frame:
    """Coordinate fields of a chunk of slices (shapes broadcast to (m, S, S))."""

    k: np.ndarray       # slice indices (m,)
    w: np.ndarray       # (m,1,1) mm above the first slice
    u: np.ndarray       # (m,1,1) normalised height, 0 skull base .. 1 vertex
    x: np.ndarray       # (1,1,S) mm, head-centred
    y: np.ndarray       # (1,S,1) mm, head-centred, posterior positive
    a: np.ndarray       # (m,1,1) inner-skull semi-axis along x (mm)
    b: np.ndarray       # (m,1,1) inner-skull semi-axis along y (mm)
    d: np.ndarray       # (m,S,S) signed distance to the inner skull (mm, < 0 inside)
    phi: np.ndarray     # (m,S,S) elliptic angle of the point
    r: np.ndarray       # (m,S,S) distance from the head axis (mm)
    brain: np.ndarray   # (m,S,S) bool, inside the inner skull
    sulcus_arc: np.ndarray    # (m,S,S) mm to the nearest sulcus' centre line
    sulcus_depth: np.ndarray  # (m,S,S) how deep (mm) that sulcus reaches
    ventricles: tuple   # (left, right) bool (m,S,S) lateral ventricles

    def subset(self, sel: np.ndarray) -> "Frame":
        """The same fields restricted to the slices where ``sel`` (bool (m,)) holds."""
        m = len(self.k)

        def take(v):
            return v[sel] if isinstance(v, np.ndarray) and v.shape[0] == m else v

        return Frame(**{name: (tuple(take(t) for t in val) if isinstance(val, tuple) else take(val))
                        for name, val in vars(self).items()})


class HeadPhantom:
    """Anatomy and lesions of one series; ``render`` turns slice indices into HU.

    All random parameters are drawn in ``__init__`` from ``rng``, so a phantom
    is fully determined by its seed and arguments.
    """

    def __init__(self, rng: np.random.Generator, *, size: int, pixel_spacing: float,
                 n_slices: int, slice_spacing: float, subtypes=()):
        self.size, self.ps = int(size), float(pixel_spacing)
        self.n, self.dz = int(n_slices), float(slice_spacing)
        fov_half = self.size * self.ps / 2
        # head outer AP semi-axis fills 80-88 % of the half field of view
        self.skull_mm = rng.uniform(5.0, 7.5)
        self.scalp_mm = rng.uniform(3.5, 6.0)
        b_out = rng.uniform(0.80, 0.88) * fov_half
        self.b_in = b_out - self.skull_mm - self.scalp_mm
        self.a_in = self.b_in * rng.uniform(0.76, 0.84)
        self.scale = self.b_in / 82.0  # lesion and ventricle sizes follow the head size
        self.cx, self.cy = (float(v) for v in rng.uniform(-0.04, 0.04, 2) * fov_half)
        # skull base slightly below the first slice, vertex around the last one
        extent = (self.n - 1) * self.dz
        self.w_base = -rng.uniform(0.0, 0.6) * self.dz
        self.height = (extent - self.w_base + rng.uniform(-0.5, 0.8) * self.dz) / 1.02
        self.grey_hu, self.white_hu = rng.uniform(34, 40), rng.uniform(24, 30)
        # 5-8 HU per pixel at the native 512 px; a smaller image stands for a
        # downsampled one, whose pixel averages (512/size)^2 native pixels
        self.noise_sd = rng.uniform(5.0, 8.0) * min(1.0, self.size / NATIVE_SIZE)
        # smooth low-frequency variation of the parenchyma: three plane waves
        dirs = rng.normal(size=(3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.waves = [([float(v) for v in dirs[i] * 2 * np.pi / rng.uniform(30, 90)], rng.uniform(0, 2 * np.pi),
                       rng.uniform(0.8, 1.8)) for i in range(3)]
        # radial sulci: N centre lines, each with its own depth, wobbling with height
        self.n_sulci = int(rng.integers(24, 32))
        self.sulcus_phase = [float(v) for v in rng.uniform(0, 2 * np.pi, 2)]
        self.sulcus_depths = (rng.uniform(6.0, 15.0, self.n_sulci) * self.scale).astype(np.float32)
        # lateral ventricles: two ellipsoids diverging posteriorly, around u = 0.58
        s = self.scale
        self.vent = dict(x=rng.uniform(5.5, 8.0) * s, y=rng.uniform(-8, -2) * s,
                         rx=rng.uniform(5.5, 8.0) * s, ry=rng.uniform(22, 30) * s,
                         u=rng.uniform(0.55, 0.61), hu=rng.uniform(0.10, 0.13), kappa=rng.uniform(0.15, 0.3))
        self.lesions = [LESION_TYPES[t](rng, self) for t in subtypes]

    # --- geometry -----------------------------------------------------------------------
    def height_mm(self, u):
        return self.w_base + np.asarray(u) * self.height

    def profile(self, u):
        """Inner-skull size relative to its maximum at height u (0 above the vertex)."""
        return np.sqrt(np.clip(1.0 - ((u - 0.4) / 0.62) ** 2, 0.0, 1.0))

    def frame(self, ks) -> Frame:
        ks = np.asarray(ks)
        w = (ks * self.dz).astype(np.float32)[:, None, None]
        u = (w - self.w_base) / self.height
        centre = (np.arange(self.size, dtype=np.float32) - (self.size - 1) / 2) * self.ps
        x = (centre - self.cx)[None, None, :]
        y = (centre - self.cy)[None, :, None]
        p = self.profile(u).astype(np.float32)
        a = np.maximum(self.a_in * p, 1e-3)
        b = np.maximum(self.b_in * p, 1e-3)
        xa, yb = x / a, y / b
        rho = np.sqrt(xa * xa + yb * yb)
        g = np.sqrt((xa / a) ** 2 + (yb / b) ** 2)
        ratio = np.clip(rho / np.maximum(g, 1e-9), np.minimum(a, b), np.maximum(a, b))
        d = (rho - 1.0) * ratio
        phi = np.arctan2(yb, xa)
        r = np.sqrt(x * x + y * y)
        brain = d < 0
        # nearest radial sulcus: centre lines at phase + j * 2pi/N, wobbling with u
        step = 2 * np.pi / self.n_sulci
        phase = self.sulcus_phase[0] + 0.12 * np.sin(2 * np.pi * 1.5 * u + self.sulcus_phase[1])
        rel = phi - phase - 0.06 * np.sin(0.5 * d + 5 * phi)  # sulci curve as they dive in
        j = np.rint(rel / step)
        arc = np.abs(rel - j * step) * r
        depth = self.sulcus_depths[j.astype(np.int64) % self.n_sulci]
        v = self.vent
        dw = (u - v["u"]) / v["hu"]
        vents = []
        for side in (-1.0, 1.0):
            xc = side * (v["x"] + v["kappa"] * np.maximum(y - v["y"], 0))
            q = ((x - xc) / v["rx"]) ** 2 + ((y - v["y"]) / v["ry"]) ** 2 + dw * dw
            vents.append((q < 1.0) & brain)
        return Frame(k=ks, w=w, u=u, x=x, y=y, a=a, b=b, d=d, phi=phi, r=r, brain=brain,
                     sulcus_arc=arc, sulcus_depth=depth, ventricles=tuple(vents))

    # --- tissue -------------------------------------------------------------------------
    def _brain_hu(self, f: Frame) -> np.ndarray:
        """Parenchyma + CSF spaces inside the inner skull (HU, noise-free)."""
        ps = self.ps
        depth = -f.d
        hu = np.where(depth < 3.5 * self.scale, self.grey_hu, self.white_hu).astype(np.float32)
        for kvec, phase, amp in self.waves:
            hu += amp * np.cos(kvec[0] * f.x + kvec[1] * f.y + kvec[2] * f.w + phase)
        # CSF: rim under the skull, sulci (1.5 mm), fissure (2 mm), ventricles
        csf = soft_inside(depth - 1.2, ps)
        sulc = soft_inside(f.sulcus_arc - 0.75, ps) * (depth < f.sulcus_depth)
        np.maximum(csf, sulc, out=csf)
        v = self.vent
        upper = f.u > v["u"] + 0.1
        gap = (f.y > v["y"] - 0.6 * v["ry"]) & (f.y < v["y"] + 0.8 * v["ry"]) & ~upper
        fiss = soft_inside(np.abs(f.x) - 1.0, ps) * ~gap * (f.u > 0.2)
        np.maximum(csf, fiss, out=csf)
        third = (np.abs(f.x) < 1.5 * self.scale) & (np.abs(f.y - v["y"] - 6 * self.scale) < 9 * self.scale) \
            & (np.abs(f.u - (v["u"] - 0.13)) < 0.05)
        vent = f.ventricles[0] | f.ventricles[1] | third
        csf[vent] = 1.0
        hu += (CSF_HU - hu) * csf
        self._skull_base(hu, f)
        return hu

    def _skull_base(self, hu: np.ndarray, f: Frame) -> None:
        """Lowest slices: petrous ridges (bone) and an air-filled sinus, in place.

        Without them the bottom slices would look like the middle ones; real
        series start in bone and air, which brain-fraction checks and slice-
        position cues rely on.
        """
        low = f.u[:, 0, 0] < 0.22
        if not low.any():
            return
        g = f.subset(low)
        fade = np.clip((0.22 - g.u) / 0.1, 0, 1)  # (m,1,1) fades in towards the base
        a, b = g.a, g.b
        bone = np.zeros(g.d.shape, bool)
        for side in (-1.0, 1.0):  # segment from the lateral-posterior skull to the clivus
            x0, y0, x1, y1 = side * 0.85 * a, 0.15 * b, side * 0.2 * a, -0.1 * b
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((g.x - x0) * dx + (g.y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
            dist = np.hypot(g.x - x0 - t * dx, g.y - y0 - t * dy)
            bone |= dist < 4.0 * self.scale * fade
        q = (g.x / (0.28 * a)) ** 2 + ((g.y + 0.72 * b) / (0.14 * b)) ** 2
        sinus = q < fade ** 2
        rim = (q < (1.6 * fade) ** 2) & ~sinus
        sub = hu[low]
        sub[(bone | rim) & g.brain] = 1100.0
        sub[sinus & g.brain] = AIR_HU
        hu[low] = sub

    def render(self, ks, noise_rng: np.random.Generator | None = None):
        """HU (float32, (m,S,S)) and lesion masks {subtype: bool (m,S,S)} of slices ``ks``.

        The masks hold the blood pixels that read as blood: painted, and not
        sharing the pixel with the skull. ``noise_rng`` None gives the
        noise-free image (used by tests).
        """
        f = self.frame(ks)
        ps = self.ps
        thick = self.skull_mm * (1 + 0.6 * np.clip((0.25 - f.u) / 0.25, 0, 1))
        head = soft_inside(f.d - thick - self.scalp_mm, ps)
        skull = soft_inside(f.d - thick, ps)
        inner = soft_inside(f.d, ps)
        t = np.clip(f.d / thick, 0, 1)  # 0 inner table .. 1 outer table
        bone = 1500.0 - 800.0 * np.exp(-((t - 0.5) / 0.22) ** 2)
        tissue = self._brain_hu(f)
        masks = {}
        fully_inside = f.d < -0.5 * ps  # blood blended with bone would not read as blood
        for lesion in self.lesions:
            m = np.zeros(tissue.shape, bool)
            lo, hi = lesion.w_range
            sel = (f.w[:, 0, 0] >= lo) & (f.w[:, 0, 0] <= hi)
            if sel.any():  # evaluate a lesion only on the slab of slices it can reach
                sub = f.subset(sel)
                m[sel] = lesion.mask(sub)
                tissue[sel] = lesion.paint(tissue[sel], m[sel], sub)
            m &= fully_inside
            masks[lesion.subtype] = masks[lesion.subtype] | m if lesion.subtype in masks else m
        hu = AIR_HU + head * (SCALP_HU - AIR_HU) + skull * (bone - SCALP_HU) + inner * (tissue - bone)
        hu = hu.astype(np.float32)
        if noise_rng is not None:
            for i in range(len(hu)):
                hu[i] += noise_rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(self.noise_sd)
        return hu, masks

    def min_lesion_pixels(self) -> int:
        """Pixels of blood a slice needs to count as positive (an area, so resolution-free)."""
        return max(MIN_LESION_PIXELS, int(np.ceil(MIN_LESION_AREA_MM2 / self.ps ** 2)))

    def slice_labels(self, masks: dict, m: int) -> dict:
        """{subtype: bool (m,)}: a slice is positive where its lesion shows on enough pixels."""
        need = self.min_lesion_pixels()
        out = {}
        for subtype, mask in masks.items():
            out[subtype] = mask.reshape(m, -1).sum(axis=1) >= need
        return out
