#!/usr/bin/env python
"""The web viewer's timings in a real browser (the system's Chromium, through Playwright), as a user meets
them: upload to first image, one slice step with the neighbours already loaded (the page prefetches two
each side) and cold (nothing cached), and the bytes the page fetches per slice.

serve.py is started on a free port (`--serve DIR`: the serve.py of another checkout, e.g. a `git archive`
of main for a before/after in the same run; it runs in this repository, so it reads the same data); or
`--url` names one already running. Usage:

    .venv/bin/python benchmarks/viewer.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml \\
        --study data/demo/study_demo.zip [--serve /tmp/main_checkout]

What is timed: upload = the Analyze click to the first slice painted (`#views[data-row]` set, which the page
does after painting); a step = `goTo(row)` to that row painted. The medians are printed with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """async ([row, cold]) => {
    if (cold) state.cache = new Map();
    const views = document.getElementById('views');
    const painted = new Promise((done) => {
        if (views.dataset.row === String(row) && !cold) return done();
        const seen = new MutationObserver(() => { if (views.dataset.row === String(row)) { seen.disconnect(); done(); } });
        seen.observe(views, {attributes: true, attributeFilter: ['data-row']});
    });
    const t = performance.now();
    goTo(row);
    await painted;
    return performance.now() - t; }"""


def start(serve_dir: Path, settings: str, config: str) -> tuple[str, subprocess.Popen]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(serve_dir / "serve.py"), "--settings", settings, "--config", config,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2):
                return url, proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                sys.exit("serve.py did not start")
            time.sleep(0.3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--study", default="data/demo/study_demo.zip")
    ap.add_argument("--url", default=None, help="a running serve.py (else one is started)")
    ap.add_argument("--serve", default=str(ROOT), help="the checkout whose serve.py is started")
    ap.add_argument("--uploads", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("no chromium: run scripts/install_chromium.sh")
    url, proc = (args.url, None) if args.url else start(Path(args.serve).resolve(), args.settings, args.config)
    study = str(Path(args.study).resolve())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(120_000)
            uploads = []
            for i in range(args.uploads + 1):
                page.goto(url + "/")
                page.set_input_files("#files", study)
                t = time.perf_counter()
                page.click("#analyze")
                page.wait_for_function("() => document.getElementById('views').dataset.row !== undefined",
                                       polling="raf")
                if i:  # the first warms the server and the browser
                    uploads.append(time.perf_counter() - t)
            n = page.evaluate("() => state.study.slices.length")
            warm, cold = [], []
            for row in range(n):
                page.evaluate("async (row) => { for (const r of [row - 1, row + 1]) if (r >= 0 && r < state.study.slices.length)"
                              " await slice(r).catch(() => {}); }", row)
                if row + 1 < n:
                    warm.append(page.evaluate(STEP, [row + 1, False]))
            for row in range(n):
                cold.append(page.evaluate(STEP, [row, True]))
            sizes = page.evaluate("""() => performance.getEntriesByType('resource')
                .filter(e => /\\/slices\\/\\d+\\/(hu|image)\\.png/.test(e.name)).map(e => e.encodedBodySize)""")
            size = page.evaluate("() => state.study.study.source_size")
            browser.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"machine: {platform.node()} (CPU, {os.cpu_count()} cores); Chromium headless; page at 1440x900")
    print(f"study: {n} slices of {size[0]}x{size[1]} px; server {args.url or Path(args.serve).resolve()}")
    print(f"upload to first image: median {statistics.median(uploads):.2f} s over {len(uploads)} uploads")
    print(f"slice step, neighbours preloaded: median {statistics.median(warm):.1f} ms, max {max(warm):.1f} ms "
          f"over {len(warm)} steps")
    print(f"slice step, cold (nothing cached): median {statistics.median(cold):.1f} ms, max {max(cold):.1f} ms "
          f"over {len(cold)} steps")
    print(f"bytes per slice (PNG body): median {statistics.median(sizes) / 1024:.1f} kB over {len(sizes)} fetches")


if __name__ == "__main__":
    main()
