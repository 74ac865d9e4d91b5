import numpy as np
import pytest

from conftest import phantom
from ich.dicom import read_stored
from ich.image import Window, apply_windows, crop_box, process_slice, window_linear, window_sigmoid

BRAIN = Window("brain", 40, 80)


def test_linear_window_matches_definition():
    hu = np.linspace(-200, 300, 1001, dtype=np.float32).reshape(1, -1)
    got = window_linear(hu, BRAIN).astype(float)
    ref = np.clip((hu - 0) / 80 * 255, 0, 255)
    assert np.abs(got - ref).max() <= 0.5 + 1e-6  # rounding only
    assert got[0, 0] == 0 and got[0, -1] == 255


def test_sigmoid_window_is_smooth_and_monotonic():
    hu = np.linspace(-200, 300, 1001, dtype=np.float32).reshape(1, -1)
    got = window_sigmoid(hu, BRAIN).astype(int)[0]
    assert np.all(np.diff(got) >= 0)
    center = got[np.argmin(np.abs(hu[0] - 40))]
    assert 120 <= center <= 135
    assert got[np.argmin(np.abs(hu[0] - 0))] <= 2 and got[np.argmin(np.abs(hu[0] - 80))] >= 253


def test_apply_windows_channel_order():
    hu = np.full((4, 4), 60.0, dtype=np.float32)
    out = apply_windows(hu, [BRAIN, Window("bone", 40, 380)])
    assert out.shape == (4, 4, 2) and out.dtype == np.uint8
    assert out[0, 0, 0] == round(60 / 80 * 255) and out[0, 0, 1] == round((60 + 150) / 380 * 255)


def test_crop_box_finds_the_head_not_the_holder():
    hu = np.full((256, 256), -1000.0, dtype=np.float32)
    hu[60:200, 80:180] = 40.0  # head
    hu[20:240, 5:8] = 100.0    # head holder arc, separate from the head
    y0, y1, x0, x1 = crop_box(hu)
    assert y1 - y0 == x1 - x0  # square
    assert y0 <= 60 and y1 >= 200 and x0 > 8 and x1 - x0 < 160
    assert crop_box(np.full((64, 64), -1000.0, dtype=np.float32)) is None


@pytest.mark.parametrize("crop", [False, True])
def test_process_real_slice(real_slice, crop):
    header, stored = read_stored(real_slice)
    img, quality = process_slice(stored, header, size=128, windows=[BRAIN, Window("bone", 40, 380)], crop=crop)
    assert img.shape == (128, 128, 2) and img.dtype == np.uint8
    assert quality["fixes"] == "padding" and quality["cropped"] == crop
    assert 0.2 < quality["brain_fraction"] < 0.6
    # the brain window shows mid-grey tissue; the corners are air
    assert img[0, 0, 0] == 0 and 40 < img[48:80, 48:80, 0].mean() < 160


def test_process_bits12(tmp_path):
    from synthetic.dicom_writer import write_ct_slice
    hu = phantom(64)
    write_ct_slice(tmp_path / "a.dcm", hu, sop_uid="ID_a", patient_id="ID_p", study_uid="ID_s",
                   series_uid="ID_se", bits12_quirk=True)
    header, stored = read_stored(tmp_path / "a.dcm")
    img, quality = process_slice(stored, header, size=64, windows=[BRAIN])
    assert quality["fixes"] == "bits12"
    assert img[0, 0, 0] == 0 and img[32, 32, 0] == round(np.clip(round(hu[32, 32]), -1000, 3071) / 80 * 255)


@pytest.mark.parametrize("crop", [False, True])
def test_fast_path_matches_float_reference(real_slice, crop):
    """Clip + resize in stored int16 units, then HU: same as the float path to rounding."""
    from ich.dicom import to_hu
    from ich.image import _crop, resize
    header, stored = read_stored(real_slice)
    windows = [BRAIN, Window("subdural", 80, 200), Window("bone", 40, 380)]
    fast, _ = process_slice(stored, header, size=128, windows=windows, crop=crop)
    hu = to_hu(stored, header)
    if crop:
        hu = _crop(hu, crop_box(hu), -1024.0)
    ref = apply_windows(resize(hu, 128), windows)
    diff = np.abs(fast.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3



@pytest.mark.parametrize("n_windows", [1, 2, 3, 5])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_windows_by_table_are_the_float_passes_byte_for_byte(monkeypatch, n_windows, sigmoid):
    """The look-up table of windows_by_table gives the very bytes (and brain_fraction) of HU + windows computed
    on every pixel, on int16 and uint16 slices of wide and narrow value ranges, any slope, cropped or not."""
    import ich.image as image
    from ich.dicom import SliceHeader
    windows = [BRAIN, Window("subdural", 80, 200), Window("bone", 40, 380), Window("wide", 0, 2000),
               Window("narrow", 300, 50)][:n_windows]
    table, used = image.windows_by_table, []

    def counted(*args):
        used.append(1)
        return table(*args)

    def floats(small, to_hu_small, w, s):
        return image.windows_and_brain(to_hu_small(small), w, s)

    rng = np.random.default_rng(n_windows)
    for trial in range(8):
        dtype = (np.int16, np.uint16)[trial % 2]
        info = np.iinfo(dtype)
        lo, hi = sorted(rng.integers(info.min, info.max, 2)) if trial < 4 else (0 if trial % 2 else -1100, 3000)
        stored = rng.integers(lo, hi + 1, (256, 256)).astype(dtype)
        header = SliceHeader("a", "p", "s", "se", (0, 0, 0), (1, 0, 0, 0, 1, 0), 256, 256, 0.5,
                             float(rng.choice([1.0, 0.5, 2.5])), float(rng.uniform(-3000, 100)), 16,
                             int(dtype == np.int16), 40, 80)
        for size in (256, 128):
            kw = dict(size=size, windows=windows, sigmoid=sigmoid, crop=bool(trial % 3 == 0))
            monkeypatch.setattr(image, "windows_by_table", counted)
            got, got_quality = image.process_slice(stored, header, **kw)
            monkeypatch.setattr(image, "windows_by_table", floats)
            want, want_quality = image.process_slice(stored, header, **kw)
            assert got.shape == want.shape == (size, size, n_windows) and got.flags.c_contiguous
            assert np.array_equal(got, want), (trial, size)
            assert got_quality == want_quality
    assert len(used) == 16  # every slice went through the table (or its own fallback for a too wide range)
