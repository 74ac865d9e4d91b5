#!/usr/bin/env python
"""The web application's upload-to-results time for one study, and where it goes.

One study of `--slices` slices (taken from a series of the prepared test
split, e.g. the demo's generated data) is zipped and posted to the web app
(web/app.py, in-process through FastAPI's TestClient: the HTTP handling,
the upload's folder, the in-memory engine: decode, stage one with every fold model,
stage two and the JSON answer, as serve.py runs them). The server's
start-up (loading and warming the models) is timed on its own line; then
the study is posted `--repeats` times and the median is reported with the
time of each stage. Targets: <= 0.5 s (5 s before the in-memory engine) on 2 CPU cores with the demo
model, <= 2 s on a GPU with the shipped experiments. Usage:

    .venv/bin/python benchmarks/study.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def study_bytes(settings, n: int) -> bytes:
    """n consecutive slices of the longest series of the prepared test split, as a zip."""
    import pandas as pd
    slices = pd.read_parquet(settings.test_clean_dir / "slices.parquet").sort_values("slice_index")
    series = slices["series_id"].value_counts().index[0]
    ids = slices.loc[slices.series_id == series, "image_id"].tolist()
    if len(ids) < n:
        sys.exit(f"the longest test series has {len(ids)} slices, fewer than --slices {n}")
    start = (len(ids) - n) // 2
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, image_id in enumerate(ids[start:start + n]):
            z.write(settings.raw_data_dir / "stage_2_test" / f"{image_id}.dcm", f"STUDY/IM{i:04d}")
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--malloc", choices=("glibc", "mapped", "one-arena"), default="glibc",
                    help="glibc: its defaults (an arena per thread, a moving mmap threshold); mapped: blocks of "
                         "1 MB and more mapped on their own (mallopt M_MMAP_THRESHOLD), which returns a deleted "
                         "result's memory sooner but cost stage one 40%% (BENCHMARKS.md, session 9); one-arena: "
                         "every thread in glibc's main arena (web.heap.one_arena, what serve.py runs with "
                         "since session 10); a process-wide setting: run them in turn")
    args = ap.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from ich.settings import load_settings
    from web.app import create_app
    from web.engine import load_engine

    from web import heap
    if args.malloc == "mapped":
        heap.set_option(heap.M_MMAP_THRESHOLD, 1 << 20)
    elif args.malloc == "one-arena":
        heap.one_arena()
    t = time.perf_counter()
    engine = load_engine(args.settings, args.config)
    client = TestClient(create_app(engine), base_url="http://127.0.0.1")  # a Host the server answers to
    startup = time.perf_counter() - t
    data = study_bytes(load_settings(args.settings), args.slices)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.node()} ({device}); torch threads {torch.get_num_threads()}")
    print(f"model: {engine.model['folds']} + stage two {engine.model['stage_two']}; malloc: {args.malloc}")
    print(f"server start-up (load + warm the models, not counted below): {startup:.2f} s")
    runs = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        r = client.post("/api/studies", files={"files": ("study.zip", data, "application/zip")})
        wall = time.perf_counter() - t
        if r.status_code != 201:
            sys.exit(f"upload failed: {r.status_code} {r.text[:500]}")
        doc = r.json()
        client.delete(f"/api/studies/{doc['id']}")
        label = "first upload (not counted)" if i == 0 else f"run {i}"
        print(f"{label:28s} {wall:6.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in doc["timings_s"].items()))
        if i:
            runs.append((wall, doc["timings_s"]))
    median = statistics.median(w for w, _ in runs)
    stages = {k: statistics.median(t[k] for _, t in runs) for k in runs[0][1]}
    print(f"\n{args.slices}-slice study, upload to results: median {median:.2f} s over {args.repeats} runs "
          f"(target <= 0.5 s on 2 CPU cores with the demo model, <= 2 s on a GPU)")
    print("median per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))

    # the viewer's slice step (target: < 100 ms): one slice at its source resolution in HU (hu.png)
    doc = client.post("/api/studies", files={"files": ("study.zip", data, "application/zip")}).json()
    steps = []
    for row in range(len(doc["slices"])):
        t = time.perf_counter()
        r = client.get(f"/api/studies/{doc['id']}/slices/{row}/hu.png")
        steps.append(time.perf_counter() - t)
        if r.status_code != 200:
            sys.exit(f"hu.png failed: {r.status_code} {r.text[:300]}")
    size = doc["study"]["source_size"]
    print(f"viewer slice step (hu.png, {size[0]}x{size[1]} HU): median {1000 * statistics.median(steps):.0f} ms, "
          f"max {1000 * max(steps):.0f} ms over {len(steps)} slices (target < 100 ms)")
    engine.close()


if __name__ == "__main__":
    main()
