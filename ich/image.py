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

from .dicom import HU_MAX, HU_MIN, SliceHeader, fix_bits12, to_hu

cv2.setNumThreads(1)  # parallelism comes from worker processes, not OpenCV threads

HEAD_HU = -500.0  # above this: scalp, skull, brain (the crop's bounding box)
BRAIN_HU = (0.0, 80.0)  # brain-like tissue, for the brain_fraction quality column


@dataclass(frozen=True)
class Window:
    name: str
    center: float
    width: float


def crop_box(img: np.ndarray, threshold: float = HEAD_HU, margin: int = 4) -> tuple[int, int, int, int] | None:
    """Square bounding box (y0, y1, x0, x1) of the head, or None when no head is found.

    The head is the largest connected region above `threshold` (HU, or the
    equivalent stored value), found on a 4x subsampled mask (fast), so the head
    holder and table arcs beside it do not widen the box.
    """
    step = 4 if min(img.shape) >= 128 else 1
    mask = (img[::step, ::step] > threshold).astype(np.uint8)
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


def _crop(img: np.ndarray, box, fill: float) -> np.ndarray:
    """Crop that may reach outside the image: the outside is `fill` (air)."""
    y0, y1, x0, x1 = box
    h, w = img.shape
    pad = max(0, -y0, -x0, y1 - h, x1 - w)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=fill)
        y0, y1, x0, x1 = y0 + pad, y1 + pad, x0 + pad, x1 + pad
    return img[y0:y1, x0:x1]


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
    channels = [fn(hu, w) for w in windows]
    return cv2.merge(channels) if len(channels) > 1 else channels[0][..., None]


def process_slice(stored: np.ndarray, header: SliceHeader, *, size: int, windows,
                  sigmoid: bool = False, crop: bool = False) -> tuple[np.ndarray, dict]:
    """Stored pixels -> (cached uint8 image, quality columns).

    Fast path for 16-bit stored values (every CT file in practice): clip the
    padding and resize in stored units, with OpenCV on int16, and convert to
    HU only on the small image. Resizing before the HU affine is exact (area
    averaging is linear); only values above 3071 HU (metal) are clipped after
    averaging instead of before, which no window can see.
    """
    fixes = []
    slope, intercept = header.slope, header.intercept
    if header.needs_bits12_fix:
        stored, intercept = fix_bits12(stored), -1000.0
        fixes.append("bits12")
    if slope <= 0 or stored.dtype not in (np.int16, np.uint16):
        hu = to_hu(stored, header)  # general path, float32 HU from the start
        lo, to_hu_small = HU_MIN, None
    else:
        hu = stored
        lo = float(np.ceil((HU_MIN - intercept) / slope))  # stored value of -1024 HU
        info = np.iinfo(stored.dtype)
        lo = min(max(lo, info.min), info.max)
        if cv2.minMaxLoc(stored)[0] < lo:
            hu = cv2.max(stored, lo)
            if not fixes:
                fixes.append("padding")

        def to_hu_small(small):
            out = small.astype(np.float32)
            if slope != 1:
                out *= np.float32(slope)
            out += np.float32(intercept)
            return cv2.min(out, HU_MAX)
    cropped = False
    if crop:
        threshold = HEAD_HU if to_hu_small is None else (HEAD_HU - intercept) / slope
        box = crop_box(hu, threshold)
        if box is not None:
            hu, cropped = _crop(hu, box, lo), True
    small = resize(hu, size)
    if to_hu_small is not None and small.dtype in (np.int16, np.uint16):
        image, brain = windows_by_table(small, to_hu_small, windows, sigmoid)
    else:
        if to_hu_small is not None:
            small = to_hu_small(small)
        image, brain = windows_and_brain(small, windows, sigmoid)
    return image, {"brain_fraction": brain / small.size, "cropped": cropped, "fixes": " ".join(fixes)}


def windows_and_brain(hu: np.ndarray, windows, sigmoid: bool) -> tuple[np.ndarray, int]:
    """(H, W) float32 HU -> (the windows as uint8 channels, the number of brain-like pixels)."""
    image = apply_windows(hu, windows, sigmoid)
    return image, cv2.countNonZero(cv2.inRange(hu, BRAIN_HU[0], BRAIN_HU[1]))


TABLE_ALIGN = 64  # table length a multiple of every SIMD width: OpenCV runs the table and the image through
                  # the same vector code (an image of size x size pixels is such a multiple too)


def windows_by_table(small: np.ndarray, to_hu_small, windows, sigmoid: bool) -> tuple[np.ndarray, int]:
    """windows_and_brain(to_hu_small(small)) for integer stored values, by a look-up table: the same bytes.

    After the resize the image is still in stored units (int16 / uint16), so
    every output byte is a function of one stored value: HU and the windows
    are computed once per distinct value in [min, max] (a few thousand on a
    CT slice) by the very same functions, and the image only looks them up,
    instead of seven float passes over every pixel (what made a decoded
    slice cost several times its pydicom read). tests/test_image.py holds it
    byte for byte equal to the float passes.
    """
    lo, hi = (int(v) for v in cv2.minMaxLoc(small)[:2])
    n = -(-(hi - lo + 1) // TABLE_ALIGN) * TABLE_ALIGN
    if n > small.size:  # a tiny image of a wide range: the float passes are cheaper
        return windows_and_brain(to_hu_small(small), windows, sigmoid)
    top = np.iinfo(small.dtype).max
    values = np.minimum(np.arange(lo, lo + n, dtype=np.int32), top).astype(small.dtype).reshape(1, n)
    table, brain_flags = windows_and_brain_table(to_hu_small(values), windows, sigmoid)
    index = small.astype(np.int32)
    index -= lo
    c = table.shape[-1]
    if c == 1:
        image = np.take(table[0, :, 0], index)[..., None]
    else:
        packed = np.zeros((n, 4), np.uint8)
        packed[:, :min(c, 4)] = table[0, :, :4]
        image = np.take(packed.view(np.uint32)[:, 0], index).view(np.uint8).reshape(*small.shape, 4)
        if c == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)  # drops the 4th byte: the channels keep their order
        elif c == 2:
            image = np.ascontiguousarray(image[..., :2])
        elif c > 4:  # more windows than a 32-bit word holds: look up the rest as well
            image = np.concatenate([image, table[0][index][..., 4:]], axis=-1)
    return image, _count_flagged(small, index, brain_flags, lo)


def windows_and_brain_table(hu_values: np.ndarray, windows, sigmoid: bool) -> tuple[np.ndarray, np.ndarray]:
    """The table of windows_by_table: (1, n) HU -> (1, n, windows) uint8 and the (n,) brain flags."""
    return apply_windows(hu_values, windows, sigmoid), cv2.inRange(hu_values, BRAIN_HU[0], BRAIN_HU[1])[0] > 0


def _count_flagged(small: np.ndarray, index: np.ndarray, flags: np.ndarray, lo: int) -> int:
    """Pixels whose value is flagged: one range test in stored units when the flagged values are one run
    (HU grows with the stored value), else by looking every pixel up."""
    at = np.flatnonzero(flags)
    if not len(at):
        return 0
    if at[-1] - at[0] + 1 == len(at):
        return cv2.countNonZero(cv2.inRange(small, int(at[0]) + lo, int(at[-1]) + lo))
    return int(np.count_nonzero(np.take(flags, index)))
