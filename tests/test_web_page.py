"""The page, driven by Playwright in the system's Chromium (Playwright's own browser download cannot
work offline), at 1440x900 and 390x844, as a radiologist would use it: one large view and, in the same
step, the slice's number, probabilities and chart marker; a result pushed out of the server's memory;
one slice number in the page, CSV, JSON, SR and chart; OHIF's directions (wheel, arrows, swipe) and a
help overlay; the series of an upload; plain error words; downloads named by their threshold; a link that
restores slice, window and threshold; dark by default; axe-core (scripts/install_axe.sh) on every page
state with 0 violations. One server (conftest `served`) and one browser for the module; the study is
uploaded once and each case opens it by its link.

The README's screenshots are these steps on a running server (the demo's, or any):
`python serve.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml` and then
`PYTHONPATH=.:tests python tests/test_web_page.py --screenshot docs/web_app.png --phone docs/web_app_phone.png`."""
import base64
import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, sr_problems, study_zip
from ich.labels import LABELS, SUBTYPES

playwright = pytest.importorskip("playwright.sync_api")
WIDE = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
CODES = re.compile(r"\b[a-z]+_[a-z_]+\b")  # an internal code such as not_dicom


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], check=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip("headless Chromium missing and scripts/install_chromium.sh could not install it")
    return shutil.which("chromium")


def axe_source() -> str:
    if not AXE.is_file():
        try:
            subprocess.run(["bash", str(REPO / "scripts" / "install_axe.sh")], check=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pytest.skip("axe-core missing and scripts/install_axe.sh could not install it (npm)")
    return AXE.read_text()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def study(prepared, tmp_path_factory):
    return study_zip(prepared, tmp_path_factory.mktemp("page") / "study.zip")


def post(url: str, zpath: Path) -> dict:
    """An upload from another client (not the page)."""
    import requests
    with open(zpath, "rb") as f:
        r = requests.post(url + "/api/studies", files={"files": (zpath.name, f, "application/zip")}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def result(served, study):
    """The study uploaded once: (base URL, its result document, the zip, the image ids)."""
    url, _, _ = served
    zpath, ids = study
    return url, post(url, zpath), zpath, ids


def open_page(browser, url, viewport=WIDE, path="/", **kwargs):
    page = browser.new_page(viewport=viewport, accept_downloads=True, **kwargs)
    page.set_default_timeout(20_000)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error"  # a CSP violation too
            and not m.text.startswith("Failed to load resource") else None)  # the 4xx the tests ask for
    page.goto(url + path)
    return page


def phone_page(browser, url, path="/"):
    return open_page(browser, url, viewport=PHONE, path=path, is_mobile=True, has_touch=True, device_scale_factor=2)


def done(page):
    """No script error and no CSP violation on the page; then close it."""
    assert not page.errors, page.errors
    page.close()


def wait_slice(page, row=None):
    """Until the view shows a slice (row, when given): its image or its "image unavailable" state."""
    want = "true" if row is None else f"document.getElementById('views').dataset.row === '{row}'"
    page.wait_for_function(f"() => document.getElementById('views').dataset.row !== undefined && {want}")


def open_result(browser, url, doc, viewport=WIDE, hash_="", **kwargs):
    page = (phone_page(browser, url, f"/?result={doc['id']}{hash_}") if viewport is PHONE
            else open_page(browser, url, viewport, f"/?result={doc['id']}{hash_}", **kwargs))
    page.wait_for_selector("#results:not([hidden])")
    wait_slice(page)
    return page


def upload(page, zpath):
    page.set_input_files("#files", str(zpath))
    page.click("#analyze")
    page.wait_for_selector("#results:not([hidden])", timeout=60_000)
    page.wait_for_function("() => document.getElementById('status').textContent === 'done'")
    wait_slice(page)


def row(page) -> int:
    return page.evaluate("() => state.row")


def shown(page) -> dict:
    """What the page says of the shown slice, each from its own place: the heading, the view's caption and
    aria-label, the probabilities table, the chart's slider value, the painted row."""
    return page.evaluate("""() => ({
        heading: document.getElementById('slice-label').textContent,
        pos: document.querySelector('#main-view .pos').textContent,
        label: document.getElementById('main-view').getAttribute('aria-label'),
        chart: Number(document.getElementById('chart').getAttribute('aria-valuenow')),
        painted: Number(document.getElementById('views').dataset.row),
        view: document.getElementById('views').dataset.state,
        probs: Object.fromEntries([...document.querySelectorAll('#slice-probs tbody tr')]
                                  .map(r => [r.dataset.label, Number(r.cells[1].textContent)])),
        row: state.row})""")


def assert_one_truth(page, n):
    """The heading, the view's caption, the chart's marker, the probabilities and the painted image all name
    the same slice (1-based)."""
    s = shown(page)
    k = s["row"] + 1
    assert s["heading"] == f"{k} of {n}" and s["pos"] == f"slice {k} / {n}" and s["label"].startswith(f"slice {k} of")
    assert s["chart"] == k and s["painted"] == s["row"], s
    want = page.evaluate(f"() => state.study.slices[{s['row']}]")
    assert s["probs"] == {lab: round(want[lab], 3) for lab in LABELS}
    return s


def canvas_mean(page) -> float:
    return page.evaluate("""() => { const c = document.querySelector('#main-view canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i]; return s / (d.length / 4); }""")


def chart_x(page, r) -> tuple[float, float]:
    """Page coordinates of slice row r on the chart, at half its height."""
    return page.evaluate(f"""() => {{ const b = document.getElementById('chart').getBoundingClientRect();
        return [b.left + xOf({r}, state.chartBox), b.top + b.height / 2]; }}""")


def download(page, selector) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    d = info.value
    return d.suggested_filename, Path(d.path()).read_bytes()


def box(page, selector) -> dict:
    return page.locator(selector).bounding_box()


def axe_violations(page) -> list:
    """axe-core's violations on the page as it is (every rule of the default set and the experimental
    label-content-name-mismatch: a glyph button whose name differs from what it shows)."""
    if not page.evaluate("() => !!window.axe"):
        page.evaluate(axe_source())  # evaluated, not a <script>: the page's CSP allows no inline script
    found = page.evaluate("""() => axe.run(document, {rules: {'label-content-name-mismatch': {enabled: true}}})
        .then(r => r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))})))""")
    return found


# ---- 1. one state, one truth; a result gone from the server ------------------------------------------------
def test_slice_image_number_probabilities_and_chart_change_together(browser, result):
    url, doc, _, ids = result
    n = len(ids)
    page = open_result(browser, url, doc)
    assert_one_truth(page, n)
    # a slice whose image cannot load: "image unavailable" in the view, never the previous image; the
    # number, the probabilities and the chart go to it together
    page.route(re.compile(r".*/slices/2/hu\.png.*"), lambda route: route.fulfill(
        status=500, content_type="application/json", body='{"error": "test"}'))
    page.evaluate("() => { state.cache = new Map(); goTo(1); }")
    wait_slice(page, 1)
    assert shown(page)["view"] == "image" and page.is_hidden("#main-view .unavailable")
    page.locator("#main-view").focus()
    page.keyboard.press("ArrowDown")
    wait_slice(page, 2)
    s = assert_one_truth(page, n)
    assert s["view"] == "unavailable" and page.is_visible("#main-view .unavailable")
    assert "Image unavailable: slice 3" in page.inner_text("#main-view .unavailable")
    assert canvas_mean(page) == 0  # the previous slice is not left on screen
    page.keyboard.press("ArrowDown")
    wait_slice(page, 3)
    assert assert_one_truth(page, n)["view"] == "image" and page.is_hidden("#main-view .unavailable")
    done(page)


# ---- 2. one slice number in the page, CSV, JSON, SR and chart ---------------------------------------------
def test_one_slice_number_in_page_csv_json_sr_and_chart(browser, result):
    url, doc, _, ids = result
    n = len(ids)
    page = open_result(browser, url, doc)
    top = page.evaluate("() => maxRow('any')")
    assert row(page) == top and assert_one_truth(page, n)
    page.fill("#threshold", "0.3")
    page.dispatch_event("#threshold", "input")
    runs_on_page = page.inner_text("#summary tbody tr[data-label=any] td:nth-child(4)")
    name, data = download(page, "#downloads a[data-kind=csv]")
    text = data.decode()
    assert "# slice_number is the 1-based position" in text  # says which convention
    table = pd.read_csv(io.StringIO(text), comment="#")
    assert table["slice_number"].tolist() == list(range(1, n + 1)) and "slice_index" not in table
    with zipfile.ZipFile(result[2]) as z:  # the DICOM InstanceNumber beside it, where the file has one
        import pydicom
        want = [pydicom.dcmread(io.BytesIO(z.read(f)), stop_before_pixels=True).get("InstanceNumber")
                for f in table["file"]]
    assert [None if pd.isna(v) else int(v) for v in table["instance_number"]] == [
        None if v in (None, "") else int(v) for v in want]
    assert table["file"].tolist() == [f"PATIENT/SER1/IM{i:04d}" for i in range(n)]  # row k is slice k + 1
    _, data = download(page, "#downloads a[data-kind=json]")
    js = json.loads(data)
    assert "1-based" in js["slice_numbering"]
    assert [s["slice_number"] for s in js["slices"]] == list(range(1, n + 1))
    on_json = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in js["above_threshold"]["any"]["runs"]) or "none"
    assert on_json == runs_on_page  # the same numbers as the page's summary
    _, data = download(page, "#downloads a[data-kind=sr]")
    import highdicom as hd
    sr = hd.sr.srread(io.BytesIO(data))
    ident = [g.tracking_identifier for g in sr.content.get_image_measurement_groups()
             if g.tracking_identifier != "study summary"]
    assert ident[top].startswith(f"slice {top + 1} (") and f"slice {row(page) + 1} of {n}" in page.get_attribute(
        "#main-view", "aria-label")
    assert b"numbered 1 to" in data  # the SR says which convention too
    # the chart: its ticks and its readout count from 1, as the heading
    x, y = chart_x(page, 0)
    page.mouse.move(x + 1, y)
    assert page.inner_text("#readout").startswith("slice 1:")
    done(page)


# ---- 3. OHIF's directions; a help overlay -------------------------------------------------------------------
def test_directions_wheel_arrows_swipe_and_help(browser, result):
    url, doc, _, ids = result
    n = len(ids)
    page = open_result(browser, url, doc, hash_="#slice=10")
    assert row(page) == 9
    view = box(page, "#main-view")
    cx, cy = view["x"] + view["width"] / 2, view["y"] + view["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, 100)  # wheel down: the next image
    wait_slice(page, 10)
    page.mouse.wheel(0, -100)
    wait_slice(page, 9)
    page.locator("#main-view").focus()
    page.keyboard.press("ArrowDown")  # down: the next image, as the wheel
    wait_slice(page, 10)
    page.keyboard.press("ArrowUp")
    wait_slice(page, 9)
    page.keyboard.press("ArrowRight")  # left/right step nothing (they did before)
    page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(100)
    assert row(page) == 9
    page.keyboard.press("End")
    wait_slice(page, n - 1)
    page.keyboard.press("PageUp")
    wait_slice(page, n - 1 - max(2, round(n / 10)))
    page.keyboard.press("Home")
    wait_slice(page, 0)
    assert_one_truth(page, n)
    # "?" opens the help, which lists the keys; Esc closes it and gives the focus back
    page.keyboard.press("?")
    assert page.is_visible("#help")
    keys = page.inner_text("#help")
    for words in ("↓", "wheel down", "next slice", "Page Down", "Home / End", "1 / 2 / 3", "full screen", "?"):
        assert words in keys, words
    page.keyboard.press("ArrowDown")  # the help owns the keys while it is open
    assert row(page) == 0
    page.keyboard.press("Escape")
    assert page.is_hidden("#help")
    page.close()

    # a one-finger drag on a phone: down = next, the series spanning the view at 8 to 24 px a slice
    page = open_result(browser, url, doc, viewport=PHONE, hash_="#slice=5")
    view = box(page, "#main-view")
    step = max(8, min(24, view["height"] / n))
    swipe = """([x, y, dy]) => { const v = document.getElementById('main-view');
        const ev = (type, yy) => v.dispatchEvent(new PointerEvent(type, {pointerType: 'touch', pointerId: 7,
            clientX: x, clientY: yy, bubbles: true, isPrimary: true}));
        ev('pointerdown', y); ev('pointermove', y + dy / 2); ev('pointermove', y + dy); ev('pointerup', y + dy); }"""
    cx, cy = view["x"] + view["width"] / 2, view["y"] + 20
    page.evaluate(swipe, [cx, cy, 3 * step + 1])  # down three slices' worth
    wait_slice(page, 7)
    page.evaluate(swipe, [cx, cy + 100, -(2 * step + 1)])  # up two
    wait_slice(page, 5)
    pinch = """([x, y]) => { const v = document.getElementById('main-view');
        const ev = (type, id, xx) => v.dispatchEvent(new PointerEvent(type, {pointerType: 'touch', pointerId: id,
            clientX: xx, clientY: y, bubbles: true}));
        ev('pointerdown', 11, x - 20); ev('pointerdown', 12, x + 20); ev('pointermove', 12, x + 60);
        ev('pointerup', 12, x + 60); ev('pointerup', 11, x - 20); }"""
    page.evaluate(pinch, [cx, cy + 50])  # two fingers apart: 40 -> 80 px, twice the zoom
    assert page.evaluate("() => state.zoom") == 2 and row(page) == 5
    done(page)


# ---- 4. the image first, at 1440x900; full screen keeps the chart and the probabilities ---------------------
def test_one_large_view_with_probabilities_and_chart_beside_it(browser, result):
    url, doc, _, ids = result
    n = len(ids)
    page = open_result(browser, url, doc)
    view, chart, probs = box(page, "#main-view"), box(page, "#chart"), box(page, "#slice-probs")
    assert view["height"] >= 0.8 * WIDE["height"] and view["y"] + view["height"] <= WIDE["height"]  # fills the height
    assert view["width"] >= 700 and view["y"] < 160
    for b in (chart, probs):  # beside it, on the first screen
        assert b["x"] >= view["x"] + view["width"] and b["y"] + b["height"] <= WIDE["height"]
    size = page.evaluate("() => [document.querySelector('#main-view canvas').width, state.study.study.source_size[1]]")
    assert size[0] == size[1]  # the slice at its source resolution
    # the chosen window; the others one key or click away, on the same view
    assert page.inner_text("#main-view .cap") == "brain · C 40 W 80"
    page.locator("#main-view").focus()
    page.keyboard.press("3")
    assert page.inner_text("#main-view .cap") == "bone · C 600 W 2800"
    assert page.get_attribute("#windows button[data-window=bone]", "aria-pressed") == "true"
    page.click("#windows button[data-window=subdural]")
    assert page.inner_text("#main-view .cap") == "subdural · C 80 W 200"
    page.keyboard.press("1")
    before = canvas_mean(page)
    # window/level: a drag; zoom; pan; reset
    cx, cy = view["x"] + view["width"] / 2, view["y"] + view["height"] / 2
    r0 = row(page)
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 30, steps=5)
    page.mouse.up()
    c, w = map(int, re.fullmatch(r"custom · C (-?\d+) W (\d+)", page.inner_text("#main-view .cap")).groups())
    assert c > 40 and w > 80 and canvas_mean(page) != before and row(page) == r0  # a drag is no slice step
    page.click("#wl-reset")
    assert page.inner_text("#main-view .cap") == "brain · C 40 W 80"
    page.click("#zoom-in")
    assert "scale(1.25)" in page.get_attribute("#main-view .stage", "style")
    page.keyboard.down("Control")
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -100)
    page.keyboard.up("Control")
    assert page.evaluate("() => state.zoom") > 1.25 and row(page) == r0
    page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(cx + 30, cy, steps=3)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.evaluate("() => state.panX") == 30
    page.click("#zoom-reset")
    assert page.evaluate("() => [state.zoom, state.panX]") == [1, 0]
    # the Grad-CAM overlay on the shown slice
    page.check("#overlay-toggle")
    page.wait_for_function("() => { const i = document.querySelector('#main-view .cam');"
                           " return !i.hidden && i.complete && i.naturalWidth > 0; }")
    assert f"/slices/{row(page)}/cam.png" in page.get_attribute("#main-view .cam", "src")
    page.uncheck("#overlay-toggle")
    # full screen: a larger image, the probabilities and the chart still beside it
    page.keyboard.press("f")
    full, chart, probs = box(page, "#main-view"), box(page, "#chart"), box(page, "#slice-probs")
    assert full["height"] > view["height"] and full["height"] >= WIDE["height"] - 20
    for b in (chart, probs):
        assert b["x"] >= full["x"] + full["width"] and b["y"] + b["height"] <= WIDE["height"] and b["width"] > 200
    page.keyboard.press("ArrowDown")
    wait_slice(page, r0 + 1)
    assert_one_truth(page, n)
    page.keyboard.press("Escape")
    assert page.locator("#workspace.full").count() == 0
    # a slice step with the neighbours preloaded stays fast (benchmarks/viewer.py measures it)
    page.keyboard.press("Home")
    wait_slice(page, 0)
    ms = page.evaluate("""async () => { const t = performance.now();
        for (let i = 1; i <= 6; i++) { goTo(i); await slice(i); }
        return (performance.now() - t) / 6; }""")
    assert ms < 100, f"{ms:.0f} ms a slice step"
    # without the source files (a series over the server's cap) the view rebuilds HU from the cached windows:
    # at the brain window it is then the cached brain image itself
    page.evaluate("() => { state.study.source_images = false; state.cache = new Map(); renderView({}); goTo(6); }")
    wait_slice(page, 6)
    page.wait_for_timeout(50)
    diff = page.evaluate("""async () => {
        const want = await pixels(sliceUrl(state.row, 'brain'));
        const c = document.querySelector('#main-view canvas'), got = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        if (got.width !== want.width) return 999;
        let d = 0; for (let i = 0; i < got.data.length; i += 4) d = Math.max(d, Math.abs(got.data[i] - want.data[i]));
        return d; }""")
    assert diff <= 2
    done(page)


# ---- 5. several series: all on the first screen, switched without a second upload ---------------------------
def test_series_on_the_first_screen_and_switched_without_upload(browser, served, prepared, tmp_path):
    url, _, _ = served
    zpath, ids = study_zip(prepared, tmp_path / "two.zip", n_other=4)
    doc = post(url, zpath)
    page = open_result(browser, url, doc)
    series = box(page, "#series-box")
    assert series and series["y"] + series["height"] <= WIDE["height"]
    assert page.locator("#series-list li").count() == len(doc["series"]) >= 2
    assert "Chosen by the server: series 1" in page.inner_text("#series-why")
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    other = page.locator("#series-list button[aria-pressed=false]").first
    other.click()
    page.wait_for_function(f"() => state.study.slices.length !== {len(ids)}")
    wait_slice(page)
    n2 = page.evaluate("() => state.study.slices.length")
    page.wait_for_function("() => location.search.includes('series=')")  # the link names the series
    assert n2 == 4 and posts == []
    assert_one_truth(page, n2)
    assert page.get_attribute("#series-list button[aria-pressed=true]", "data-series") != "0"
    done(page)


# ---- 6. a phone: the image first, then the probabilities, then the chart; nothing sticky over the image ----
def test_phone_image_first_then_probabilities_then_chart(browser, result):
    url, doc, _, _ = result
    page = open_result(browser, url, doc, viewport=PHONE)
    view, probs, chart = box(page, "#main-view"), box(page, "#slice-probs"), box(page, "#chart")
    assert view["y"] < 250 and view["y"] + view["height"] <= PHONE["height"]  # the whole image on the first screen
    assert view["y"] + view["height"] <= probs["y"] < chart["y"]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for y in (0, 300, 900):  # nothing fixed or sticky covers the image, wherever the page is scrolled
        page.evaluate(f"window.scrollTo(0, {y})")
        covered = page.evaluate("""() => { const v = document.getElementById('main-view').getBoundingClientRect();
            const out = [];
            for (const [x, y] of [[v.left + 10, v.top + 10], [v.left + v.width / 2, v.top + v.height / 2]]) {
                if (y < 0 || y > innerHeight) continue;
                const e = document.elementFromPoint(x, y);
                if (e && !document.getElementById('main-view').contains(e)) out.push(e.id || e.className); }
            return out; }""")
        assert covered == [], covered
    sticky = page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e =>
        ['sticky', 'fixed'].includes(getComputedStyle(e).position) && e.offsetParent !== null).map(e => e.id)""")
    assert sticky == [], sticky
    chart_canvas = page.evaluate("() => document.getElementById('chart').width")
    assert chart["width"] >= 300 and chart_canvas >= 600  # sharp on a 2x screen
    done(page)


# ---- 7. plain words for every error; a failed upload after a good one ------------------------------------
def test_errors_in_plain_words_and_a_failed_upload_replaces_the_results(browser, result, tmp_path):
    url, doc, zpath, _ = result
    page = open_result(browser, url, doc)
    drop = """([name, b64]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true})); }"""
    page.evaluate(drop, ["notes.txt", base64.b64encode(b"not a study").decode()])
    assert "notes.txt" in page.inner_text("#chosen")
    page.click("#analyze")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "not a DICOM file" in message and "notes.txt" in message and "Upload one .zip" in message
    assert not CODES.search(message), message
    assert "/tmp" not in message
    # the old results are closed, not left beside the error; a link opens them again
    assert page.is_hidden("#results") and "result=" not in page.url
    assert page.eval_on_selector("#progress", "e => e.hidden && e.value === 0")
    page.click("#error a")
    page.wait_for_selector("#results:not([hidden])")
    wait_slice(page)
    assert page.evaluate("() => state.study.id") == doc["id"]
    # two zips: one study at a time, said before anything is sent
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    two = [tmp_path / "a.zip", tmp_path / "b.zip"]
    for p in two:
        shutil.copy(zpath, p)
    page.set_input_files("#files", [str(p) for p in two])
    page.click("#analyze")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "one study at a time" in message and "Upload one .zip" in message and posts == []
    # a good upload after that clears the error
    page.evaluate(drop, [zpath.name, base64.b64encode(zpath.read_bytes()).decode()])
    page.click("#analyze")
    page.wait_for_function(f"() => state.study && state.study.id !== '{doc['id']}' && "
                           "document.getElementById('status').textContent === 'done'", timeout=60_000)
    assert page.is_hidden("#error") and page.is_hidden("#stale")
    # a link to a result the server does not have: said in words, on the page
    page.goto(url + "/?result=nosuchresult")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "no longer on the server" in message and "Upload the study again" in message and "result=" not in page.url
    # the skipped files' reasons are words
    page.goto(url + f"/?result={doc['id']}")
    page.wait_for_selector("#results:not([hidden])")
    reasons = page.eval_on_selector_all("#skipped tbody tr td:nth-child(2)", "tds => tds.map(t => t.textContent)")
    assert reasons and not any(CODES.search(r) for r in reasons), reasons
    done(page)


# ---- 8. downloads named by their threshold, the threshold in the CSV ----------------------------------------
def test_downloads_carry_the_threshold_in_name_and_columns(browser, result):
    url, doc, _, ids = result
    page = open_result(browser, url, doc)
    tag = doc["tag"]
    names = {}
    for cut in ("0.3", "0.5"):
        page.fill("#threshold", cut)
        page.dispatch_event("#threshold", "input")
        name, data = download(page, "#downloads a[data-kind=csv]")
        table = pd.read_csv(io.StringIO(data.decode()), comment="#")
        assert (table["threshold"] == float(cut)).all() and len(table) == len(ids)
        names[cut] = name
        kaggle, _ = download(page, "#downloads a[data-kind=kaggle_csv]")
        js, data = download(page, "#downloads a[data-kind=json]")
        assert json.loads(data)["threshold"] == float(cut)
        sr, data = download(page, "#downloads a[data-kind=sr]")
        assert sr_problems(data) == []
        chart, data = download(page, "#chart-png")
        assert data[:4] == b"\x89PNG"
        t = f"{float(cut):.2f}"
        assert (name, kaggle, js, sr, chart) == (f"{tag}_t{t}.csv", f"{tag}_t{t}_kaggle.csv", f"{tag}_t{t}.json",
                                                 f"{tag}_t{t}_sr.dcm", f"{tag}_t{t}_chart.png")
    assert names["0.3"] != names["0.5"]
    page.fill("#threshold", "1")  # no download threshold: the links say they are off
    page.dispatch_event("#threshold", "input")
    assert page.get_attribute("#downloads a[data-kind=sr]", "aria-disabled") == "true"
    done(page)


# ---- 9. the URL keeps slice, window and threshold; a reload restores them ---------------------------------
def test_a_reload_restores_slice_window_and_threshold(browser, result):
    url, doc, _, ids = result
    page = open_result(browser, url, doc)
    page.locator("#main-view").focus()
    page.keyboard.press("Home")
    wait_slice(page, 0)
    for _ in range(4):
        page.keyboard.press("ArrowDown")
    wait_slice(page, 4)
    page.keyboard.press("3")
    page.fill("#threshold", "0.3")
    page.dispatch_event("#threshold", "input")
    page.wait_for_function("() => location.hash.includes('t=0.3') && location.hash.includes('window=bone')"
                           " && location.hash.includes('slice=5')")
    assert f"result={doc['id']}" in page.url
    page.reload()
    page.wait_for_selector("#results:not([hidden])")
    wait_slice(page, 4)
    assert page.inner_text("#slice-label") == f"5 of {len(ids)}"
    assert page.inner_text("#main-view .cap") == "bone · C 600 W 2800" and page.input_value("#threshold") == "0.3"
    # a custom window/level too
    view = box(page, "#main-view")
    page.mouse.move(view["x"] + 300, view["y"] + 300)
    page.mouse.down()
    page.mouse.move(view["x"] + 340, view["y"] + 320, steps=3)
    page.mouse.up()
    cap = page.inner_text("#main-view .cap")
    c, w = re.fullmatch(r"custom · C (-?\d+) W (\d+)", cap).groups()
    page.wait_for_function(f"() => location.hash.includes('wl={c},{w}')")
    page.reload()
    wait_slice(page, 4)
    assert page.inner_text("#main-view .cap") == cap
    done(page)


# ---- 10. dark by default, a light switch, a skip link, the chart by keyboard, readout beside the chart ----
def test_theme_skip_link_keyboard_chart_and_readout(browser, result):
    url, doc, _, ids = result
    n = len(ids)
    page = open_result(browser, url, doc)
    dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert page.get_attribute("html", "data-theme") == "dark" and dark == "rgb(17, 19, 23)"
    page.click("#theme")
    assert page.get_attribute("html", "data-theme") == "light" and page.get_attribute("#theme", "aria-pressed") == "true"
    page.reload()
    page.wait_for_selector("#results:not([hidden])")
    assert page.get_attribute("html", "data-theme") == "light"  # remembered
    page.click("#theme")
    # the skip link: the first Tab stop on a fresh page, to the image
    page.goto(url + f"/?result={doc['id']}")
    wait_slice(page)
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main-view"
    page.keyboard.press("End")
    wait_slice(page, n - 1)
    # the chart: a slider by keyboard
    page.focus("#chart")
    page.keyboard.press("ArrowLeft")
    wait_slice(page, n - 2)
    assert page.get_attribute("#chart", "aria-valuenow") == f"{n - 1}" and page.get_attribute("#chart", "role") == "slider"
    page.keyboard.press("Home")
    wait_slice(page, 0)
    # the hover readout is under the chart, not over it
    x, y = chart_x(page, 3)
    page.mouse.move(x, y)
    chart, readout = box(page, "#chart"), box(page, "#readout")
    assert page.inner_text("#readout").startswith("slice 4:") and readout["y"] >= chart["y"] + chart["height"]
    # scrub along the chart: the image follows
    page.mouse.down()
    x5, _ = chart_x(page, 5)
    page.mouse.move(x5, y, steps=3)
    page.mouse.up()
    wait_slice(page, 5)
    assert_one_truth(page, n)
    # buttons say what they show (no glyph with another name); the threshold stays inside (0, 1)
    for sel in ("#prev", "#next", "#zoom-in", "#zoom-out"):
        assert page.get_attribute(sel, "aria-label") is None and page.inner_text(sel).strip()
    assert page.get_attribute("#threshold", "max") == "0.99"
    assert page.get_attribute("#status", "aria-live") == "polite" and page.get_attribute("#error", "role") == "alert"
    done(page)


def test_axe_has_no_violations_on_any_page_state(browser, result):
    url, doc, _, _ = result
    found = {}
    for theme in ("dark", "light"):
        for size in ("wide", "phone"):
            page = phone_page(browser, url) if size == "phone" else open_page(browser, url)
            if theme == "light":
                page.click("#theme")
            found[f"landing {theme} {size}"] = axe_violations(page)
            page.goto(url + f"/?result={doc['id']}")
            page.wait_for_selector("#results:not([hidden])")
            wait_slice(page)
            page.click("#skipped-box summary")
            found[f"results {theme} {size}"] = axe_violations(page)
            page.keyboard.press("?")
            found[f"help {theme} {size}"] = axe_violations(page)
            page.close()
    assert all(v == [] for v in found.values()), {k: v for k, v in found.items() if v}


# ---- 1 (last: it pushes every earlier result out of the server's memory) ---------------------------------------
def test_a_result_pushed_out_of_memory_says_so_and_downloads_stay_on_the_page(browser, result, prepared, tmp_path):
    url, _, zpath, ids = result
    doc = post(url, zpath)
    n = len(ids)
    page = open_result(browser, url, doc, hash_="#slice=1")  # slices 1-3 loaded, the last one not
    assert_one_truth(page, n)
    here = page.url
    # eight newer uploads from another client push this result out (the server keeps the last 8);
    # a 3-slice study keeps them quick
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(zpath) as z, zipfile.ZipFile(small, "w") as out:
        for name in [m for m in z.namelist() if "/SER1/" in m][:3]:
            out.writestr(name, z.read(name))
    for _ in range(8):
        post(url, small)
    # a download now does not leave the page for the server's JSON: the page says the result is gone
    page.click("#downloads a[data-kind=csv]")
    page.wait_for_selector("#gone:not([hidden])")
    gone = page.inner_text("#gone")
    assert "no longer on the server" in gone and "Upload the study again" in gone
    assert page.url.split("#")[0] == here.split("#")[0]
    assert page.get_attribute("#downloads a[data-kind=csv]", "aria-disabled") == "true"
    # End: the number, probabilities and chart go to the last slice, and the view says its image is gone
    # instead of keeping the slice shown before
    page.locator("#main-view").focus()
    page.keyboard.press("End")
    wait_slice(page, n - 1)
    s = assert_one_truth(page, n)
    assert s["view"] == "unavailable" and canvas_mean(page) == 0
    assert "no longer on the server" in page.inner_text("#main-view .unavailable")
    page.click("#gone button")
    assert page.evaluate("() => document.activeElement.id") == "files"
    done(page)


def screenshots(b, url: str, zpath: Path, wide: str, phone: str):
    """The README's screenshots: the result at 1440x900 (Grad-CAM on the slice the model finds most
    bleeding in) and at 390x844."""
    page = open_page(b, url)
    upload(page, zpath)
    page.check("#overlay-toggle")
    page.wait_for_function("() => { const i = document.querySelector('#main-view .cam');"
                           " return !i.hidden && i.complete && i.naturalWidth > 0; }")
    page.wait_for_timeout(300)
    page.screenshot(path=wide)
    page.close()
    page = phone_page(b, url)
    upload(page, zpath)
    page.wait_for_timeout(300)
    page.screenshot(path=phone)
    page.close()


if __name__ == "__main__":  # the README's screenshots: these steps on a running serve.py (the demo's)
    import argparse

    ap = argparse.ArgumentParser(description="drive the page of a running serve.py and save screenshots")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--study", default="data/demo/study_demo.zip")
    ap.add_argument("--screenshot", default="docs/web_app.png")
    ap.add_argument("--phone", default="docs/web_app_phone.png")
    args = ap.parse_args()
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        screenshots(b, args.url, Path(args.study), args.screenshot, args.phone)
        b.close()
    print(f"screenshots: {args.screenshot}, {args.phone}")
