"""The page, driven by Playwright in the system's Chromium (Playwright's own browser download cannot
work offline): upload a generated study, read the chart and the summary, click a slice, step with the
arrow keys, turn the Grad-CAM overlay on and off, download the CSV.

The README's screenshot is these same steps on the demo's server and study:
`python serve.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml` and then
`PYTHONPATH=.:tests python tests/test_web_page.py --screenshot docs/web_app.png`."""
import io
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, study_zip
from ich.labels import LABELS, SUBTYPES

playwright = pytest.importorskip("playwright.sync_api")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], check=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip("headless Chromium missing and scripts/install_chromium.sh could not install it")
    return shutil.which("chromium")


def test_upload_chart_slice_overlay_and_download(served, prepared, tmp_path):
    url, _, _ = served
    zpath, ids = study_zip(prepared, tmp_path / "study.zip")
    drive_page(url, zpath, n_slices=len(ids), n_skipped=3, model="tiny (3 folds)",
               screenshot=os.environ.get("ICH_SCREENSHOT"))


def drive_page(url: str, zpath: Path, *, n_slices: int, n_skipped: int, model: str, screenshot=None):
    """What a user does on the page, with assertions at each step."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 1900}, accept_downloads=True)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        assert "Research use only" in page.inner_text("#notice")
        page.set_input_files("#files", str(zpath))
        page.click("#analyze")
        page.wait_for_selector("#results:not([hidden])", timeout=60_000)
        assert page.inner_text("#status") == "done"
        assert page.eval_on_selector("#progress", "e => e.value") == 100
        assert "stage one" in page.inner_text("#timings")

        # the chart: drawn with every label's colour, over the series
        painted = page.evaluate("""() => { const c = document.getElementById('chart');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++;
            return n; }""")
        assert painted > 2000
        assert page.locator("#legend span").all_inner_texts() == list(LABELS)

        # the summary: one row per label, the model and its out-of-fold score, the skipped files
        assert page.locator("#summary tbody tr").count() == len(LABELS)
        assert model in page.inner_text("#model") and "out-of-fold" in page.inner_text("#model")
        assert page.inner_text("#skipped-title") == f"{n_skipped} file(s) not used, each with its reason"
        page.fill("#threshold", "0")  # every slice is above 0: one range over the whole series
        assert page.inner_text(f"#summary tbody tr[data-label={SUBTYPES[0]}] td:nth-child(4)") == f"1–{n_slices}"
        page.fill("#threshold", "0.5")

        # click the chart's left edge -> slice 1; arrow key -> slice 2
        box = page.locator("#chart").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 40 / 1000 + 1, box["y"] + box["height"] / 2)
        assert page.inner_text("#slice-label") == f"1 of {n_slices}"
        page.locator("body").press("ArrowRight")
        assert page.inner_text("#slice-label") == f"2 of {n_slices}"
        page.wait_for_function("() => [...document.querySelectorAll('#views .base')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#views .view").count() == 3

        # the Grad-CAM overlay: on (image loads), opacity follows the slider, off again
        row = page.evaluate("() => state.study.slices.reduce((b, r, i, s) => r.any > s[b].any ? i : b, 0)")
        page.mouse.click(box["x"] + box["width"] * (40 + row * 950 / max(n_slices - 1, 1)) / 1000 + 1,
                         box["y"] + box["height"] / 2)  # the slice the model finds most bleeding in
        assert page.inner_text("#slice-label") == f"{row + 1} of {n_slices}"
        page.check("#overlay-toggle")
        top = page.evaluate("() => ['epidural','intraparenchymal','intraventricular','subarachnoid','subdural']"
                            ".reduce((b, l) => state.study.slices[state.row][l] > state.study.slices[state.row][b]"
                            " ? l : b, 'epidural')")
        page.select_option("#cam-label", top)
        page.wait_for_function("() => [...document.querySelectorAll('#views .cam')]"
                               ".every(i => !i.hidden && i.complete && i.naturalWidth > 0)")
        page.fill("#opacity", "70")
        page.dispatch_event("#opacity", "input")
        assert page.eval_on_selector("#views .cam", "e => e.style.opacity") == "0.7"
        if screenshot:
            page.wait_for_timeout(300)
            page.screenshot(path=str(screenshot), full_page=True)
        page.uncheck("#overlay-toggle")
        assert page.eval_on_selector_all("#views .cam", "els => els.every(e => e.hidden)")

        # download the CSV: the notice, then one row per slice
        with page.expect_download() as info:
            page.click("#downloads a[data-kind=csv]")
        download = info.value
        assert download.suggested_filename == "study.csv"
        text = Path(download.path()).read_text()
        assert text.startswith("# Research use only")
        assert len(pd.read_csv(io.StringIO(text), comment="#")) == n_slices
        assert not errors, errors
        browser.close()


if __name__ == "__main__":  # the README's screenshot: this test's steps on a running serve.py (the demo's)
    import argparse
    import zipfile

    ap = argparse.ArgumentParser(description="drive the page of a running serve.py and save a screenshot")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--study", default="data/demo/study_demo.zip")
    ap.add_argument("--model", default="demo_cpu (5 folds)")
    ap.add_argument("--screenshot", default="docs/web_app.png")
    args = ap.parse_args()
    with zipfile.ZipFile(args.study) as z:
        n = len(z.namelist())
    drive_page(args.url, Path(args.study), n_slices=n, n_skipped=0, model=args.model, screenshot=args.screenshot)
    print(f"page checked; screenshot: {args.screenshot}")
