#!/usr/bin/env python
"""serve.py under a hostile client, case by case, with a normal user uploading a study beside each attack.

Starts serve.py on a free port of 127.0.0.1 (loopback only) with the given
model and its default bounds (web/settings.py), warms it with one valid
study, times that study's upload when idle, then runs each case of
BENCHMARKS.md's hostile table for a bounded time. Per case it measures:
- the server's peak memory above idle, its process and every process under
  it (the upload readers, the forkserver) together, sampled every 50 ms, as
  anonymous PSS (a page shared by the forked readers counts once in all), and how it
  was split at the peak sample (main, forkserver, readers: where to look);
- the normal user's upload time during the attack against idle (or its
  503 and Retry-After, where the server says it is full): the worst of up
  to 3 uploads made one after the other while the attack lasts, the first
  1 s after the attack's files are made and its requests start (making the
  files is this script's work, not the server's, and is not timed); the
  ratio is given against the run's idle time and against the median of 3
  normal uploads made just before the case (the other load on a shared
  machine drifts over a run of minutes);
- the statuses the attack got (a 500 is a failure), files left in the
  server's folder after the case, and the RSS above idle once the results
  the attack made are deleted (nothing may stay).
Targets: <= 300 MB above idle, the normal upload <= 3x idle (or a prompt
503 with Retry-After), no 500, 0 files left, nothing retained.

The hostile files are generated here (tests/hostile.py and below), at the
issue's sizes unless an option scales them. Every loop is bounded; nothing
is sent anywhere but 127.0.0.1.

    .venv/bin/python benchmarks/hostile.py --settings S.json --config study.yaml --study study.zip
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile import anon_kb, anon_mb, deflate_bomb, process_tree, stop, zip_bomb, zip_of  # noqa: E402

HOST = "127.0.0.1"


# --- the server's memory -----------------------------------------------------------------------------------
def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def tree_mb(pid: int) -> dict:
    """The tree's anonymous PSS by process (MB): main (serve.py), forkserver (multiprocessing's, a child of main), the
    upload readers (forked from the forkserver: summed, with their count) and other (the resource tracker)."""
    out = {"main": 0.0, "forkserver": 0.0, "readers": 0.0, "n_readers": 0, "other": 0.0}
    for p in process_tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            cmd = b""
        parent = _parent(p)
        kind = ("main" if p == pid else "forkserver" if b"forkserver" in cmd and parent == pid
                else "readers" if parent != pid else "other")
        out[kind] += anon_kb(p) / 1024
        out["n_readers"] += kind == "readers"
    return out


class Peak:
    """The tree's peak anonymous PSS, sampled every 50 ms, and how it was split at that sample (main, forkserver,
    readers)."""

    def __init__(self, pid):
        self.pid, self.peak, self.done, self.split = pid, 0.0, threading.Event(), {}

    def __enter__(self):
        self.peak = anon_mb(self.pid)
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self):
        while not self.done.is_set():
            split = tree_mb(self.pid)
            now = split["main"] + split["forkserver"] + split["readers"] + split["other"]
            if now > self.peak:
                self.peak, self.split = now, split
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


# --- HTTP ------------------------------------------------------------------------------------------------
def multipart(name: str, data: bytes, boundary: str = "hostilebench") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(port: int, path: str, *, data: bytes | None = None, name: str = "study.zip", method: str | None = None,
            headers: dict | None = None, timeout: float = 300, body: tuple[bytes, str] | None = None
            ) -> tuple[int, bytes, dict]:
    """body: a multipart body made before (multipart()), so that making it is not timed."""
    body, ctype = body or (multipart(name, data) if data is not None else (None, None))
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body, method=method or ("POST" if body else "GET"),
                                 headers={**({"Content-Type": ctype} if ctype else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    except (OSError, TimeoutError) as e:
        return 0, str(type(e).__name__).encode(), {}


def upload(port: int, data: bytes | None, name: str = "study.zip", body: tuple[bytes, str] | None = None
           ) -> tuple[int, dict]:
    status, body, _ = request(port, "/api/studies", data=data, name=name, body=body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {}


# --- hostile files -----------------------------------------------------------------------------------------
def upload_times(port: int, study: Path, n: int) -> tuple[list[float], dict]:
    """The normal user's upload times over n uploads, each result deleted after, and the last answer."""
    times, doc = [], {}
    for _ in range(n):
        t0 = time.time()
        _, doc = upload(port, study)
        times.append(time.time() - t0)
        request(port, f"/api/studies/{doc.get('id')}", method="DELETE")
    return times, doc


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def slices_like(template: bytes, n: int, size: int, *, series: str, private_mib: int = 0, name: str | None = None,
                j2k: bytes | None = None) -> dict:
    """n slices of one new series, size x size (zeros, native), or with the given JPEG 2000 pixel data;
    private_mib: a private OB element of that many MiB in each."""
    ds = pydicom.dcmread(io.BytesIO(template))
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if j2k is not None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
        ds.PixelData = pydicom.encaps.encapsulate([j2k])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = bytes(2 * size * size)
    if private_mib:
        ds.add_new(0x00111010, "OB", bytes(private_mib << 20))
    if name is not None:
        ds.PatientName = name
    ds.SeriesInstanceUID = series
    out = {}
    for i in range(n):
        ds.SOPInstanceUID = f"{series}.{i + 1}"
        ds.ImagePositionPatient = [0, 0, 5.0 * i]
        out[f"{series}/{i:04d}.dcm"] = _save(ds)
    return out


def j2k_codestream(size: int, says: int | None = None) -> bytes:
    """A JPEG 2000 codestream of size x size zeros; says: its SIZ rewritten to that size (image and tile)."""
    ds = pydicom.Dataset()
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.compress(pydicom.uid.JPEG2000Lossless, np.zeros((size, size), np.int16))
    code = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    if says:
        at = code.find(b"\xff\x4f\xff\x51")
        for k in range(4):  # Xsiz, Ysiz, (XOsiz, YOsiz stay 0), XTsiz, YTsiz
            if k in (0, 1):
                code[at + 8 + 4 * k:at + 12 + 4 * k] = says.to_bytes(4, "big")
        code[at + 24:at + 28] = says.to_bytes(4, "big")
        code[at + 28:at + 32] = says.to_bytes(4, "big")
    return bytes(code)


def slow_bodies(port: int, n: int, seconds: float, statuses: list) -> None:
    """n uploads that send 1 byte every few seconds, for `seconds`; each one's status (0: none before the end)."""
    socks = []
    body, ctype = multipart("slow.zip", b"x" * 1000)
    for _ in range(n):
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall((f"POST /api/studies HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:1])
            s.setblocking(False)
            socks.append([s, 1, b""])
        except OSError:
            statuses.append(0)
    end = time.time() + seconds
    while time.time() < end:
        for item in socks:
            s, sent, reply = item
            try:
                item[2] += s.recv(4096)
            except (BlockingIOError, OSError):
                pass
            if not item[2] and sent < len(body):
                try:
                    s.send(body[sent:sent + 1])
                    item[1] += 1
                except OSError:
                    pass
        time.sleep(5)
    for s, _, reply in socks:
        try:
            reply += s.recv(4096)
        except OSError:
            pass
        statuses.append(int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0)
        s.close()


# --- the run -----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--study", required=True, help="a zip of one valid study (e.g. the demo's)")
    ap.add_argument("--seconds", type=float, default=30, help="how long each flood lasts")
    ap.add_argument("--only", default=None, help="run the cases whose name holds this text (several: a,b)")
    ap.add_argument("--small", action="store_true", help="every file and count scaled down (the CI's check)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each case this many times in a row: what a case keeps only the first time (a size's "
                         "first use: kernels, buffers) against what every one keeps")
    args = ap.parse_args()
    big, huge, mib, many = (256, 1024, 2, 10) if args.small else (4096, 16384, 100, 200)
    n_slow, n_big_series, n_elements = (10, 6, 9000) if args.small else (300, 60, 90000)
    study = Path(args.study).read_bytes()
    with zipfile.ZipFile(io.BytesIO(study)) as z:
        members = {m: z.read(m) for m in z.namelist()}
    template = next(v for k, v in members.items() if v[128:132] == b"DICM")
    three = dict(list((k, v) for k, v in members.items() if v[128:132] == b"DICM")[:3])

    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="ich_bench_hostile_"))
    log_path = work / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--settings", args.settings, "--config",
                             args.config, "--port", str(port), "--work-dir", str(work / "w")], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        deadline = time.time() + 300
        while request(port, "/api/health", timeout=2)[0] != 200:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit("serve.py did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        status, doc = upload(port, study)  # warm: every path once (SR, CSV, images, Grad-CAM), then forgotten
        assert status == 201, doc
        for path in ("download/sr", "download/json", "download/csv", "slices/0/hu.png", "slices/0/image.png",
                     "slices/0/cam.png"):
            request(port, f"/api/studies/{doc['id']}/{path}")
        request(port, f"/api/studies/{doc['id']}", method="DELETE")
        idle_times, doc = upload_times(port, study, 5)
        idle_s = float(np.median(idle_times))
        time.sleep(1)
        idle = anon_mb(proc.pid)
        print(f"idle by process: { {k: round(v) for k, v in tree_mb(proc.pid).items()} }", flush=True)
        print(f"idle: {idle:.0f} MB (anonymous PSS of the server and its processes), a normal upload {idle_s:.2f} s (median "
              f"of {[round(t, 2) for t in idle_times]}; server's timings of the last: {doc.get('timings_s')}; load "
              f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
        made: list[str] = []  # result ids the attack made: deleted after its case
        started, finished = threading.Event(), threading.Event()

        def go():
            """The attack's files are made: its requests start now (the normal user's clock starts 1 s later, so
            that this script's own work of making the files is not timed as the server's)."""
            started.set()

        def keep(status, doc):
            if status == 201 and doc.get("id"):
                made.append(doc["id"])
            return status

        def flood(fn, clients: int, seconds: float) -> list[int]:
            statuses, end = [], time.time() + seconds

            def one(k):
                while time.time() < end:
                    statuses.append(fn(k))
            go()
            with ThreadPoolExecutor(clients) as ex:
                list(ex.map(one, range(clients)))
            return statuses

        def viewer_study(size: int, n: int) -> str:
            status, doc = upload(port, zip_of(slices_like(template, n, size, series="1.2.826.0.1.3680043.8.498.77")))
            assert status == 201, (status, doc)
            made.append(doc["id"])
            return doc["id"]

        def case_log_marker():
            data = zip_of(slices_like(template, 4, 64, series="1.2.826.0.1.3680043.8.498.5", name="MKsolo"))
            go()
            status, doc = upload(port, data)
            statuses = [keep(status, doc)]
            statuses.append(request(port, f"/api/studies/{doc['id']}/download/sr")[0])
            time.sleep(0.5)
            found = "MKsolo" in log_path.read_text()
            return statuses, f"marker in the log: {'YES' if found else 'no'}"

        def case_thumbnails():
            code = j2k_codestream(big)
            extra = {}
            for i in range(many):
                extra.update(slices_like(template, 1, big, series=f"1.2.826.0.1.3680043.8.498.{1000 + i}", j2k=code))
            data = zip_of({**three, **extra})
            go()
            return [keep(*upload(port, data))], ""

        def case_j2k_header():
            code = j2k_codestream(64, says=huge)
            files = slices_like(template, 5, 512, series="1.2.826.0.1.3680043.8.498.6", j2k=code)
            go()
            return [keep(*upload(port, zip_of(files)))], f"{max(map(len, files.values()))} B a file"

        def case_sources():
            data = zip_of(slices_like(template, 7, big, series="1.2.826.0.1.3680043.8.498.7"))
            go()
            return [keep(*upload(port, data)) for _ in range(8)], f"{len(data) >> 10} kB a zip"

        def case_fat_headers():
            data = zip_of(slices_like(template, 10, 64, series="1.2.826.0.1.3680043.8.498.8", private_mib=mib))
            go()
            return [keep(*upload(port, data)) for _ in range(2)], f"{len(data) >> 10} kB a zip"

        def case_big_series():
            data = zip_of(slices_like(template, n_big_series, big, series="1.2.826.0.1.3680043.8.498.9"))
            go()
            return [keep(*upload(port, data))], f"{len(data) >> 10} kB zip"

        def case_png_flood(clients):
            sid = viewer_study(big, 4)
            return flood(lambda k: request(port, f"/api/studies/{sid}/slices/{k % 4}/hu.png")[0], clients,
                         args.seconds), ""

        def case_cam_flood():
            sid = viewer_study(512, 40)
            labels = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
            count = iter(range(10**6))
            return flood(lambda k: request(port, f"/api/studies/{sid}/slices/{(n := next(count)) % 40}/cam.png?label="
                                                 f"{labels[(n // 40) % 6]}")[0], 40, args.seconds), ""

        def case_slow_bodies():
            statuses = []
            go()
            slow_bodies(port, n_slow, args.seconds, statuses)
            return statuses, ""

        def slow_zip() -> bytes:
            element = b"\x09\x00\x10\x00UN\x00\x00\x00\x00\x00\x00"  # an empty private element, 12 bytes
            return zip_of({f"slow/{i:03d}": b"\0" * 128 + b"DICM" + element * n_elements for i in range(n_slow // 3)})

        def case_slow_reading():
            slow = slow_zip()
            large = multipart("big.dcm", bytes(mib << 20))  # one body for the ten: made here, not timed
            with ThreadPoolExecutor(12) as ex:
                go()
                jobs = [ex.submit(upload, port, slow) for _ in range(2)]
                time.sleep(1)
                jobs += [ex.submit(upload, port, None, body=large) for _ in range(10)]
                return [keep(*j.result()) for j in jobs], f"{len(slow) >> 20} MB a slow zip"

        def case_slow_reading_turns():
            """As many slow zips as there are turns (4): before, they held every turn for the whole read time and
            the normal study waited for one."""
            slow = slow_zip()
            with ThreadPoolExecutor(4) as ex:
                go()
                jobs = [ex.submit(upload, port, slow) for _ in range(4)]
                return [keep(*j.result()) for j in jobs], f"{len(slow) >> 20} MB a slow zip"

        def case_sr_odd():
            files = slices_like(template, 4, 64, series="1.2.826.0.1.3680043.8.498.10")
            for i, k in enumerate(list(files)):
                ds = pydicom.dcmread(io.BytesIO(files[k]))
                ds.StudyDate, ds.StudyTime, ds.PatientSex = "2024-05-06", "10:30", "Q"
                if i % 2:
                    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.11"
                files[k] = _save(ds)
            data = zip_of(files)
            go()
            status, doc = upload(port, data)
            return [keep(status, doc), request(port, f"/api/studies/{doc.get('id')}/download/sr")[0]], ""

        def case_host():
            go()
            return [request(port, "/api/health", headers={"Host": f"evil@{HOST}:{port}"})[0]], ""

        def case_422():
            go()
            status, body, _ = request(port, "/api/studies?series=no", method="POST")
            return [status], f"body keys {sorted(json.loads(body))}"

        def case_held():
            bomb = zip_bomb(400 if args.small else 4000)
            study_bomb = zip_of({**members, "BOMB.dcm": deflate_bomb(64 if args.small else 1536)}, zipfile.ZIP_STORED)
            go()
            statuses = [upload(port, bomb, "bomb.zip")[0]]
            statuses.append(keep(*upload(port, study_bomb)))
            return statuses, ""

        cases = {
            "patient name in the log (one-part name, SR download)": case_log_marker,
            f"thumbnails: 3 slices + {many} one-slice series of {big}^2 JPEG 2000": case_thumbnails,
            f"JPEG 2000 larger than its header (5 files, 512^2 said, {huge}^2 coded)": case_j2k_header,
            f"sources kept: 8 zips of 7 x {big}^2 slices": case_sources,
            f"headers keep whole files: 10 slices x {mib} MiB private element, twice": case_fat_headers,
            f"big series over the cap: {n_big_series} x {big}^2 slices": case_big_series,
            f"viewer PNG flood: hu.png of {big}^2, 8 clients, {args.seconds:g} s": lambda: case_png_flood(8),
            f"viewer PNG flood: hu.png of {big}^2, 16 clients, {args.seconds:g} s": lambda: case_png_flood(16),
            f"Grad-CAM flood: 40 clients, distinct maps, {args.seconds:g} s": case_cam_flood,
            f"slow bodies: {n_slow} uploads at 1 byte / 5 s, {args.seconds:g} s": case_slow_bodies,
            f"slow file reading: 2 zips of {n_slow // 3} x {n_elements:,} empty elements + 10 x {mib} MB uploads":
                case_slow_reading,
            f"slow file reading, 4 zips of {n_slow // 3} x {n_elements:,} empty elements": case_slow_reading_turns,
            "SR download on odd headers": case_sr_odd,
            "Host: evil@127.0.0.1": case_host,
            "422 error shape": case_422,
            "held: zip bomb 4,000 x 1 MiB, deflate bomb 1.5 GiB": case_held,
        }
        chosen = [(what, run) for what, run in cases.items()
                  if not args.only or any(part in what for part in args.only.split(","))]
        for what, run in [case for case in chosen for _ in range(args.repeat)]:
            made.clear()
            # the normal upload just before the case: the other sessions' load drifts over a run
            here_idle, _ = upload_times(port, study, 3)
            case_idle = float(np.median(here_idle))
            started.clear()
            finished.clear()
            before = anon_mb(proc.pid)
            normal = {}

            def user():
                """The normal user's upload 1 s into the attack, and again (up to 3 in all) while it lasts."""
                started.wait(600)
                time.sleep(1.0)  # the attack is under way
                times = []
                while len(times) < 3 and (not times or not finished.is_set()):
                    t0 = time.time()
                    status, body, headers = request(port, "/api/studies", data=study)
                    times.append(time.time() - t0)
                    normal.update(status=status, retry=headers.get("retry-after"), all_s=[round(t, 2) for t in times])
                    if status != 201:
                        break
                    doc = json.loads(body)
                    if times[-1] == max(times):
                        normal["timings"] = doc.get("timings_s")  # the slowest's
                    request(port, f"/api/studies/{doc['id']}", method="DELETE")
                normal["seconds"] = max(times)

            t0 = time.time()
            with Peak(proc.pid) as peak:
                u = threading.Thread(target=user)
                u.start()
                try:
                    statuses, note = run()
                finally:
                    started.set()
                    finished.set()
                u.join()
            seconds = time.time() - t0
            for sid in made:
                request(port, f"/api/studies/{sid}", method="DELETE")
            time.sleep(1)
            left = sum(1 for p in (work / "w").rglob("*") if p.is_file())
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            row = {"case": what, "statuses": counts, "seconds": round(seconds, 1),
                   "peak_above_idle_mb": round(peak.peak - idle), "before_mb": round(before - idle),
                   "peak_split_mb": {k: round(v) for k, v in peak.split.items()},
                   "after_delete_above_idle_mb": round(anon_mb(proc.pid) - idle),
                   "normal_status": normal.get("status"), "normal_s": round(normal.get("seconds", 0), 2),
                   "normal_each_s": normal.get("all_s"),
                   "normal_ratio": round(normal.get("seconds", 0) / idle_s, 1), "retry_after": normal.get("retry"),
                   "idle_before_s": round(case_idle, 2),
                   "normal_ratio_to_idle_before": round(normal.get("seconds", 0) / case_idle, 1),
                   "files_left": left, "note": note, "normal_timings_s": normal.get("timings"),
                   "load": round(os.getloadavg()[0], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"serve.py alive at the end: {proc.poll() is None}")
    finally:
        stop(proc, timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
