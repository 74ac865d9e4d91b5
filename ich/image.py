"""From stored pixels to the cached network input: HU, crop, resize, windows.

Order of operations matters for speed and for correctness:
1. stored -> HU in float32 (12-bit fix first: it is a wrap, not linear) and
   clip to [-1024, 3071] so the -2000 padding becomes air before any averaging;
2. optional crop of the black border (bounding box of the head, squared);
3. resize with area interpolation (cheap on the full image, and every later
   step then runs on the small one);
4. one uint8 channel per window, with OpenCV's saturating conversions, which
   are about 7x faster than numpy's clip + astype.
Measured by benchmarks/prepare.py; see BENCHMARKS.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .dicom import HU_MIN, SliceHeader, to_hu

cv2.setNumThreads(1)  # parallelism comes from worker processes, not OpenCV threads

HEAD_HU = -500.0  # above this: scalp, skull, brain (the crop's bounding box)
BRAIN_HU = (0.0, 80.0)  # brain-like tissue, for the brain_fraction quality column


@dataclass(frozen=True)
class Window:
    name: str
    center: float
    width: float


def crop_box(hu: np.ndarray, margin: int = 4) -> tuple[int, int, int, int] | None:
    """Square bounding box (y0, y1, x0, x1) of the head, or None when no head is found.

    The head is the largest connected region above -500 HU, found on a 4x
    subsampled mask (fast), so the head holder and table arcs beside it do not
    widen the box.
    """
    step = 4 if min(hu.shape) >= 128 else 1
    mask = (hu[::step, ::step] > HEAD_HU).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = stats[best]
    if area * step * step < 64:
        return None
    y0, y1, x0, x1 = y * step, (y + h) * step, x * step, (x + w) * step
    side = max(y1 - y0, x1 - x0) + 2 * margin
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    y0, x0 = cy - side // 2, cx - side // 2
    return int(y0), int(y0 + side), int(x0), int(x0 + side)


def _crop(hu: np.ndarray, box) -> np.ndarray:
    """Crop that may reach outside the image: the outside is air."""
    y0, y1, x0, x1 = box
    h, w = hu.shape
    pad = max(0, -y0, -x0, y1 - h, x1 - w)
    if pad:
        hu = cv2.copyMakeBorder(hu, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=-1024.0)
        y0, y1, x0, x1 = y0 + pad, y1 + pad, x0 + pad, x1 + pad
    return hu[y0:y1, x0:x1]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return img
    shrinking = img.shape[0] >= size and img.shape[1] >= size
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def window_linear(hu: np.ndarray, w: Window) -> np.ndarray:
    """[center - width/2, center + width/2] -> [0, 255], saturating outside."""
    lo = w.center - w.width / 2
    alpha = 255.0 / w.width
    return cv2.convertScaleAbs(cv2.max(hu, lo), alpha=alpha, beta=-lo * alpha)


def window_sigmoid(hu: np.ndarray, w: Window) -> np.ndarray:
    """Sigmoid window (2nd-place style): smooth instead of hard clipping.

    Scaled so the window's edges map to 1/255 and 254/255, like the linear
    window's ends, while values beyond still carry a little contrast.
    """
    ue = np.log(254.0)  # logit of 254/255
    z = (hu - np.float32(w.center)) * np.float32(2 * ue / w.width)
    out = 255.0 / (1.0 + cv2.exp(-z))
    return cv2.convertScaleAbs(out)


def apply_windows(hu: np.ndarray, windows, sigmoid: bool = False) -> np.ndarray:
    """(H, W) HU -> (H, W, len(windows)) uint8."""
    fn = window_sigmoid if sigmoid else window_linear
    return np.stack([fn(hu, w) for w in windows], axis=-1)


def process_slice(stored: np.ndarray, header: SliceHeader, *, size: int, windows,
                  sigmoid: bool = False, crop: bool = False) -> tuple[np.ndarray, dict]:
    """Stored pixels -> (cached uint8 image, quality columns)."""
    fixes = []
    if header.needs_bits12_fix:
        fixes.append("bits12")
    elif float(stored.min()) * header.slope + header.intercept < HU_MIN:
        fixes.append("padding")
    hu = to_hu(stored, header)
    cropped = False
    if crop:
        box = crop_box(hu)
        if box is not None:
            hu, cropped = _crop(hu, box), True
    small = resize(hu, size)
    image = apply_windows(small, windows, sigmoid)
    brain = float(np.mean((small >= BRAIN_HU[0]) & (small <= BRAIN_HU[1])))
    return image, {"brain_fraction": brain, "cropped": cropped, "fixes": " ".join(fixes)}
