"""The page, driven by Playwright in the system's Chromium (Playwright's own browser download cannot
work offline): upload a generated study, read the chart and the summary, use the viewer as a radiologist
would (wheel, keys, window/level drag, presets, zoom, full screen, chart scrub), take the page's threshold
into the SR and the JSON, drop files, fail an upload, reload a result's link, and lay the page out on a
phone.

The README's screenshots are these same steps on a running server (the demo's, or any):
`python serve.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml` and then
`PYTHONPATH=.:tests python tests/test_web_page.py --screenshot docs/web_app.png --phone docs/web_app_phone.png`."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, sr_problems, study_zip
from ich.labels import LABELS, SUBTYPES

playwright = pytest.importorskip("playwright.sync_api")
WIDE = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], check=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip("headless Chromium missing and scripts/install_chromium.sh could not install it")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def study(prepared, tmp_path_factory):
    return study_zip(prepared, tmp_path_factory.mktemp("page") / "study.zip")


def open_page(browser, url, viewport=WIDE, **kwargs):
    page = browser.new_page(viewport=viewport, accept_downloads=True, **kwargs)
    page.set_default_timeout(20_000)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error"  # a CSP violation too
            and not m.text.startswith("Failed to load resource") else None)  # the 4xx the tests ask for
    page.goto(url + "/")
    return page


def wait_slice(page, row=None):
    """Until the viewer shows a slice (row, when given) painted from the server's pixels."""
    want = "true" if row is None else f"document.getElementById('views').dataset.row === '{row}'"
    page.wait_for_function(f"() => document.getElementById('views').dataset.row !== undefined && {want}")


def upload(page, zpath):
    page.set_input_files("#files", str(zpath))
    page.click("#analyze")
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    page.wait_for_function("() => document.getElementById('status').textContent === 'done'")
    wait_slice(page)


def row(page) -> int:
    return page.evaluate("() => state.row")


def canvas_mean(page, index=0) -> float:
    return page.evaluate(f"""() => {{ const c = document.querySelectorAll('#views canvas')[{index}];
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i]; return s / (d.length / 4); }}""")


def chart_x(page, r) -> tuple[float, float]:
    """Page coordinates of slice row r on the chart, at half its height."""
    return page.evaluate(f"""() => {{ const b = document.getElementById('chart').getBoundingClientRect();
        return [b.left + xOf({r}, state.chartBox), b.top + b.height / 2]; }}""")


def download(page, selector) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    d = info.value
    return d.suggested_filename, Path(d.path()).read_bytes()


def test_upload_chart_summary_overlay_and_downloads_at_the_pages_threshold(browser, served, study):
    url, _, _ = served
    zpath, ids = study
    drive_page(browser, url, zpath, n_slices=len(ids), n_skipped=3, model="tiny (3 folds)",
               screenshot=os.environ.get("ICH_SCREENSHOT"))


def drive_page(browser, url: str, zpath: Path, *, n_slices: int, n_skipped: int, model: str, screenshot=None):
    """What a user does on the page, with assertions at each step."""
    page = open_page(browser, url)
    assert "Research use only" in page.inner_text("#notice")
    upload(page, zpath)
    assert page.eval_on_selector("#progress", "e => e.value") == 100
    assert "stage one" in page.inner_text("#timings")
    tag = page.evaluate("() => state.study.tag")
    assert re.fullmatch(r"ich_[A-Za-z0-9]{1,8}_\d{8}", tag) and tag in page.inner_text("#study-info")
    assert f"{n_slices} slices" in page.inner_text("#study-info")

    # the chart: beside the images on a wide screen, drawn with every label, a legend whose swatches differ
    painted = page.evaluate("""() => { const c = document.getElementById('chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++;
        return n; }""")
    assert painted > 2000
    assert page.locator("#legend span").all_inner_texts() == list(LABELS)
    dashes = page.eval_on_selector_all("#legend line", "ls => ls.map(l => l.getAttribute('stroke-dasharray'))")
    assert len(set(dashes)) >= 5  # lines differ by dash, not only colour
    chart, views = page.locator(".chart-card").bounding_box(), page.locator("#views").bounding_box()
    assert chart["x"] > views["x"] + views["width"] - 1 and views["y"] + 100 < WIDE["height"]  # side by side

    # the summary: one row per label, its "at slice" jumps there; the runs table; the model; skipped files
    assert page.locator("#summary tbody tr").count() == len(LABELS)
    assert model in page.inner_text("#model") and "out-of-fold" in page.inner_text("#model")
    assert page.inner_text("#skipped-title") == f"{n_skipped} file(s) not used, each with its reason"
    page.fill("#threshold", "0")  # every slice is above 0: one range over the whole series
    assert page.inner_text(f"#summary tbody tr[data-label={SUBTYPES[0]}] td:nth-child(4)") == f"1–{n_slices}"
    assert page.inner_text(f"#runs tbody tr[data-label={SUBTYPES[0]}] td:nth-child(2)") == f"1–{n_slices}"
    assert page.get_attribute("#downloads a[data-kind=sr]", "aria-disabled") == "true"  # 0 is no download threshold
    page.fill("#threshold", "0.5")
    page.click(f"#summary tbody tr[data-label={SUBTYPES[1]}] td:nth-child(3) button")
    best = page.evaluate(f"() => maxRow('{SUBTYPES[1]}')")
    assert row(page) == best and page.inner_text("#slice-label") == f"{best + 1} of {n_slices}"

    # click the chart at slice 1, drag along it to scrub, a hover readout
    x, y = chart_x(page, 0)
    page.mouse.click(x + 1, y)
    assert page.inner_text("#slice-label") == f"1 of {n_slices}"
    page.mouse.move(x + 1, y)
    page.mouse.down()
    x3, _ = chart_x(page, 3)
    page.mouse.move(x3, y, steps=4)
    assert row(page) == 3
    page.mouse.up()
    assert page.inner_text("#readout").startswith("slice 4:")
    page.locator("body").press("ArrowRight")
    assert page.inner_text("#slice-label") == f"5 of {n_slices}"
    wait_slice(page, 4)
    assert page.locator("#views .view").count() == 3

    # the Grad-CAM overlay on the slice the model finds most bleeding in: image, colour scale, opacity
    top_row = page.evaluate("() => maxRow('any')")
    x, y = chart_x(page, top_row)
    page.mouse.click(x, y)
    assert page.inner_text("#slice-label") == f"{top_row + 1} of {n_slices}"
    page.check("#overlay-toggle")
    assert page.is_visible("#cam-scale")
    top = page.evaluate("() => ['epidural','intraparenchymal','intraventricular','subarachnoid','subdural']"
                        ".reduce((b, l) => state.study.slices[state.row][l] > state.study.slices[state.row][b]"
                        " ? l : b, 'epidural')")
    page.select_option("#cam-label", top)
    page.wait_for_function("() => [...document.querySelectorAll('#views .cam')]"
                           ".every(i => !i.hidden && i.complete && i.naturalWidth > 0)")
    page.fill("#opacity", "70")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#views .cam", "e => e.style.opacity") == "0.7"
    wait_slice(page, top_row)
    if screenshot:
        page.wait_for_timeout(300)
        page.screenshot(path=str(screenshot))
    page.uncheck("#overlay-toggle")
    assert page.eval_on_selector_all("#views .cam", "els => els.every(e => e.hidden)")

    # downloads at the page's threshold, named by the result's tag
    table = pd.DataFrame(page.evaluate("() => state.study.slices"))
    cut = round(float(table["any"].median()), 3)
    cut = cut if 0 < cut < 1 else 0.3
    page.fill("#threshold", str(cut))
    name, data = download(page, "#downloads a[data-kind=csv]")
    assert name == f"{tag}.csv"
    text = data.decode()
    assert text.startswith("# Research use only") and f"# threshold {cut:g}:" in text
    assert len(pd.read_csv(io.StringIO(text), comment="#")) == n_slices
    name, data = download(page, "#downloads a[data-kind=json]")
    doc = json.loads(data)
    assert name == f"{tag}.json" and doc["threshold"] == cut
    assert doc["above_threshold"]["any"]["slices"] == int((table["any"] >= cut).sum())
    name, data = download(page, "#downloads a[data-kind=sr]")
    assert name == f"{tag}_sr.dcm" and sr_problems(data) == []
    import highdicom as hd
    sr = hd.sr.srread(io.BytesIO(data))
    [summary] = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "study summary"]
    counts = {m.name.value: int(m.value) for m in summary.get_measurements() if m.name.value.endswith("N")}
    assert counts["ICHN"] == int((table["any"] >= cut).sum())
    assert f"threshold={cut:g}".encode() in data
    name, data = download(page, "#chart-png")
    assert name == f"{tag}_chart.png" and data[:4] == b"\x89PNG"
    import cv2
    import numpy as np
    png = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:28]  # the legend's strip, above the plot
    for hex_colour in ("d62728", "1f77b4", "2ca02c", "9467bd", "ff7f0e"):  # every subtype's swatch
        b, g, r = (int(hex_colour[i:i + 2], 16) for i in (4, 2, 0))
        assert (np.abs(png.astype(int) - [b, g, r]).sum(axis=2) < 40).sum() >= 10, hex_colour
    assert not page.errors, page.errors
    page.close()


def test_viewer_wheel_keys_window_level_presets_zoom_full_screen(browser, served, study):
    url, _, _ = served
    zpath, ids = study
    n = len(ids)
    page = open_page(browser, url)
    upload(page, zpath)
    assert page.evaluate("() => state.study.source_images")
    size = page.evaluate("() => [document.querySelector('#views canvas').width, state.study.study.source_size[1]]")
    assert size[0] == size[1]  # the slice at its source resolution

    # the wheel over an image: one slice a notch, down = next
    page.click("#views .view >> nth=0")
    page.keyboard.press("Home")
    assert row(page) == 0
    box = page.locator("#views .view >> nth=0").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, 100)
    page.wait_for_function("() => state.row === 1")
    page.mouse.wheel(0, 100)
    page.mouse.wheel(0, -100)
    page.wait_for_function("() => state.row === 1")
    wait_slice(page, 1)

    # a swipe on a touch screen: up = next slices, 16 px a slice
    swipe = """([x, y, dy]) => { const v = document.querySelector('#views .view');
        const ev = (type, yy) => v.dispatchEvent(new PointerEvent(type, {pointerType: 'touch', pointerId: 7,
            clientX: x, clientY: yy, bubbles: true, isPrimary: true}));
        ev('pointerdown', y); ev('pointermove', y + dy / 2); ev('pointermove', y + dy); ev('pointerup', y + dy); }"""
    page.evaluate(swipe, [cx, cy, -50])
    assert row(page) == 4
    page.evaluate(swipe, [cx, cy, 34])
    assert row(page) == 2
    pinch = """([x, y]) => { const v = document.querySelector('#views .view');
        const ev = (type, id, xx) => v.dispatchEvent(new PointerEvent(type, {pointerType: 'touch', pointerId: id,
            clientX: xx, clientY: y, bubbles: true}));
        ev('pointerdown', 11, x - 20); ev('pointerdown', 12, x + 20); ev('pointermove', 12, x + 60);
        ev('pointerup', 12, x + 60); ev('pointerup', 11, x - 20); }"""
    page.evaluate(pinch, [cx, cy])  # two fingers apart: 40 -> 80 px, twice the zoom
    assert page.evaluate("() => state.zoom") == 2 and row(page) == 2
    page.click("#zoom-reset")

    # keys: End, Home, PageUp/PageDown (a tenth of the series), arrows; each step fast
    page.keyboard.press("End")
    assert row(page) == n - 1
    page.keyboard.press("PageDown")
    assert row(page) == n - 1 - max(2, round(n / 10))
    page.keyboard.press("PageUp")
    assert row(page) == n - 1
    page.keyboard.press("Home")
    wait_slice(page, 0)
    ms = page.evaluate("""async () => { const t = performance.now();
        for (let i = 1; i <= 6; i++) { goTo(i); await slice(i); }
        return (performance.now() - t) / 6; }""")
    assert ms < 100, f"{ms:.0f} ms a slice step"

    # window/level: a drag changes the active view's centre/width and its pixels; presets; reset
    wait_slice(page, 6)
    before, caption = canvas_mean(page), page.inner_text("#views .view >> nth=0 >> .cap")
    assert caption == "brain · C 40 W 80"
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 30, steps=5)
    page.mouse.up()
    after = page.inner_text("#views .view >> nth=0 >> .cap")
    c, w = map(int, re.fullmatch(r"custom · C (-?\d+) W (\d+)", after).groups())
    assert c > 40 and w > 80 and canvas_mean(page) != before
    assert row(page) == 6  # a drag is no slice step
    page.click("#presets button[data-preset=bone]")
    assert page.inner_text("#views .view >> nth=0 >> .cap") == "bone · C 600 W 2800"
    assert "600/2800" in page.inner_text("#presets")  # the presets show their centre/width
    page.click("#views .view >> nth=1")
    page.click("#presets button[data-preset=brain]")
    assert page.inner_text("#views .view >> nth=1 >> .cap") == "brain · C 40 W 80"
    page.keyboard.press("3")  # the presets' keys, on the active view
    assert page.inner_text("#views .view >> nth=1 >> .cap") == "bone · C 600 W 2800"
    page.click("#wl-reset")
    assert [page.inner_text(f"#views .view >> nth={i} >> .cap") for i in range(3)] == [
        "brain · C 40 W 80", "subdural · C 80 W 200", "bone · C 600 W 2800"]

    # zoom (buttons, Ctrl + wheel), pan (shift-drag), fit; full screen of one view and back
    page.click("#zoom-in")
    assert "scale(1.25)" in page.get_attribute("#views .stage >> nth=0", "style")
    page.mouse.move(cx, cy)
    page.keyboard.down("Control")
    page.mouse.wheel(0, -100)
    page.keyboard.up("Control")
    assert page.evaluate("() => state.zoom") > 1.25 and row(page) == 6
    page.keyboard.down("Shift")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 30, cy, steps=3)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.evaluate("() => state.panX") == 30
    page.click("#zoom-reset")
    assert page.evaluate("() => [state.zoom, state.panX]") == [1, 0]
    page.click("#views .view >> nth=2 >> .fs")
    full = page.locator("#views .view.full").bounding_box()
    assert full["width"] == WIDE["width"] and full["height"] == WIDE["height"]
    page.keyboard.press("Escape")
    assert page.locator("#views .view.full").count() == 0

    # a focused control keeps its keys: the opacity slider and the threshold, not the slices
    page.focus("#opacity")
    page.keyboard.press("ArrowRight")
    assert page.input_value("#opacity") == "51" and row(page) == 6
    page.focus("#threshold")
    page.keyboard.press("ArrowUp")
    assert page.input_value("#threshold") == "0.55" and row(page) == 6
    page.click("#next")  # a button is no key owner: the arrows step again
    page.keyboard.press("ArrowRight")
    assert row(page) == 8
    page.focus("#opacity")
    page.click("#views .view >> nth=0")  # a click on an image takes the keys back from the slider
    page.keyboard.press("ArrowLeft")
    assert row(page) == 7 and page.input_value("#opacity") == "51"
    page.dblclick("#views .view >> nth=1")
    assert page.locator("#views .view.full").count() == 1
    page.keyboard.press("Escape")

    # without the source files (a series over the server's cap) the views rebuild HU from the cached windows:
    # the brain view at the brain window is then the cached brain image itself
    page.evaluate("""() => { state.study.source_images = false; state.cache = new Map();
        delete document.getElementById('views').dataset.row; renderViews(); goTo(state.row); }""")
    wait_slice(page, row(page))
    diff = page.evaluate("""async () => {
        const want = await pixels(sliceUrl(state.row, 'brain'));
        const c = document.querySelector('#views canvas'), got = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        if (got.width !== want.width) return 999;
        let d = 0; for (let i = 0; i < got.data.length; i += 4) d = Math.max(d, Math.abs(got.data[i] - want.data[i]));
        return d; }""")
    assert diff <= 2
    assert page.inner_text("#views .view >> nth=2 >> .cap") == "bone · C 40 W 380"  # the cache's own windows

    # a visible focus ring; labels for the controls; status and errors announced
    page.focus("#prev")
    page.keyboard.press("Tab")
    ring = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert ring != "none"
    for sel in ("#prev", "#next", "#progress", "#zoom-in"):
        assert page.get_attribute(sel, "aria-label")
    assert page.locator("label[for=files]").count() == 1
    assert page.get_attribute("#status", "aria-live") == "polite" and page.get_attribute("#error", "role") == "alert"
    assert not page.errors, page.errors
    page.close()


def test_drop_bad_upload_reset_and_link_reload(browser, served, study):
    url, _, _ = served
    zpath, ids = study
    page = open_page(browser, url)
    upload(page, zpath)
    good = page.evaluate("() => state.study.id")
    assert page.url.endswith(f"?result={good}")

    # a drop shows the dropped names; a bad upload resets the bar and greys the previous results
    drop = """([name, b64]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true})); }"""
    page.evaluate(drop, ["notes.txt", base64.b64encode(b"not a study").decode()])
    assert "notes.txt" in page.inner_text("#chosen")
    assert page.evaluate("() => document.getElementById('files').files.length") == 1
    page.click("#analyze")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "could not be analysed" in message and "/tmp" not in message
    assert page.eval_on_selector("#progress", "e => e.hidden && e.value === 0")
    assert "results" in page.get_attribute("#results", "class") or page.locator("#results.stale").count() == 1
    assert page.is_visible("#stale") and "previous study" in page.inner_text("#stale")
    assert page.evaluate("() => getComputedStyle(document.querySelector('.workspace')).opacity") < "1"

    page.evaluate(drop, [zpath.name, base64.b64encode(zpath.read_bytes()).decode()])
    assert zpath.name in page.inner_text("#chosen")
    page.click("#analyze")
    page.wait_for_function(f"() => state.study.id !== '{good}' && document.getElementById('status').textContent === 'done'",
                           timeout=60_000)
    assert page.is_hidden("#error") and page.is_hidden("#stale") and page.locator("#results.stale").count() == 0
    second = page.evaluate("() => state.study.id")

    # the link: a reload shows the same result; the recent list holds both; the patient only on request
    page.reload()
    page.wait_for_selector("#results:not([hidden])")
    wait_slice(page)
    assert page.evaluate("() => state.study.id") == second
    recent = page.locator("#recent a").all_text_contents()  # this browser's results, newest first
    assert len(recent) == 2 and recent[0].startswith(page.evaluate("() => state.study.tag")), recent
    assert page.is_hidden("#patient")
    patient = page.evaluate("() => fetch(`/api/studies/${state.study.id}/patient`).then(r => r.json())")
    assert patient["patient_id"] not in page.content()
    page.click("#show-patient")
    page.wait_for_selector("#patient:not([hidden])")
    assert patient["patient_id"] in page.inner_text("#patient") and patient["patient_id"] not in page.url
    page.goto(url + "/?result=nosuchresult")
    page.wait_for_selector("#error:not([hidden])")
    assert "not on the server" in page.inner_text("#error") and "result=" not in page.url
    assert page.locator("#recent a").count() == 2
    assert not page.errors, page.errors
    page.close()


def test_phone_layout_has_no_horizontal_overflow(browser, served, study):
    url, _, _ = served
    zpath, _ = study
    page = open_page(browser, url, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    upload(page, zpath)
    page.check("#overlay-toggle")
    page.click("#skipped-box summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for span in page.locator("#legend span").all():  # each swatch stays on its label's line
        assert span.bounding_box()["height"] < 24
    chart = page.locator("#chart").bounding_box()
    assert chart["width"] >= 300 and page.evaluate("() => document.getElementById('chart').width") >= 600  # sharp
    assert not page.errors, page.errors
    page.close()


if __name__ == "__main__":  # the README's screenshots: these steps on a running serve.py (the demo's)
    import argparse
    import zipfile

    ap = argparse.ArgumentParser(description="drive the page of a running serve.py and save screenshots")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--study", default="data/demo/study_demo.zip")
    ap.add_argument("--model", default="demo_cpu (5 folds)")
    ap.add_argument("--skipped", type=int, default=0)
    ap.add_argument("--screenshot", default="docs/web_app.png")
    ap.add_argument("--phone", default="docs/web_app_phone.png")
    args = ap.parse_args()
    with zipfile.ZipFile(args.study) as z:
        n = sum(1 for m in z.namelist() if not m.endswith("/"))
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        drive_page(b, args.url, Path(args.study), n_slices=n - args.skipped, n_skipped=args.skipped,
                   model=args.model, screenshot=args.screenshot)
        page = open_page(b, args.url, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
        upload(page, Path(args.study))
        page.check("#overlay-toggle")
        page.evaluate("() => window.scrollTo(0, document.querySelector('.viewer-card').getBoundingClientRect().top"
                      " + window.scrollY - document.querySelector('.chart-card').offsetHeight - 4)")  # chart stuck on top
        page.wait_for_timeout(500)
        page.screenshot(path=args.phone)
        b.close()
    print(f"page checked; screenshots: {args.screenshot}, {args.phone}")
