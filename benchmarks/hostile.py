#!/usr/bin/env python
"""serve.py's memory under hostile uploads (issue 19): peak RSS above the idle server, per case.

Starts serve.py on a free port of 127.0.0.1 with the given model, warms it
with one valid study, then sends, one at a time, while the server's VmRSS is
sampled every 20 ms:

- zip bomb: 1,500 entries of 1 MiB of zeros (1.5 GiB unpacked, within the
  2 GiB cap; 1.5 MB zipped), then the same with a DICOM preamble ('DICM')
  before the zeros, then the issue's 60 x 1 MiB;
- deflate bomb: the valid study plus one DICOM file in the Deflated Explicit
  VR syntax whose data set inflates to 1.5 GiB (1.5 MB on disk);
- chunked bypass: `Content-Length: 10` with `Transfer-Encoding: chunked`
  and a 1.1 GiB body, and the same body chunked without a length.

Prints one line per case: status, seconds, peak RSS above idle (MB); the
target is <= 300 MB. The hostile files are generated (tests/hostile.py).

    .venv/bin/python benchmarks/hostile.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml \\
        --study data/demo/study_demo.zip
"""
from __future__ import annotations

import argparse
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile import deflate_bomb, stop, zip_bomb, zip_of  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Peak:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def multipart(name: str, data: bytes, boundary: str = "hostilebench") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, name: str, data: bytes, timeout: float = 600) -> tuple[int, str]:
    body, ctype = multipart(name, data)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies", data=body, method="POST",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()[:160].decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:160].decode("utf-8", "replace")


def chunked(port: int, gib: float, content_length: bool) -> tuple[int, str]:
    """A chunked upload of `gib` GiB of zeros in one file part, with or without `Content-Length: 10`."""
    head, ctype = multipart("big.dcm", b"")
    prefix, suffix = head[:-len(b"\r\n--hostilebench--\r\n")], b"\r\n--hostilebench--\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        s.sendall((f"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                   + ("Content-Length: 10\r\n" if content_length else "")
                   + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
        block = bytes(1 << 20)
        reply = b""
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
            for i in range(int(gib * 1024)):
                if i % 16 == 0 and select.select([s], [], [], 0)[0]:
                    reply = s.recv(65536)  # answered before the body ended: what it should do
                    break
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            else:
                s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(suffix), suffix))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    line = reply.split(b"\r\n", 1)[0].decode("latin-1")
    body = reply.split(b"\r\n\r\n", 1)[-1][:160].decode("utf-8", "replace")
    return int(line.split()[1]) if len(line.split()) > 1 else 0, body


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--study", required=True, help="a zip of one valid study (e.g. the demo's)")
    ap.add_argument("--deflate-gib", type=float, default=1.5)
    ap.add_argument("--chunked-gib", type=float, default=1.1)
    args = ap.parse_args()
    study = Path(args.study).read_bytes()

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    port_no = port.getsockname()[1]
    port.close()
    work = tempfile.mkdtemp(prefix="ich_bench_hostile_")
    log = open(Path(work) / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--settings", args.settings, "--config",
                             args.config, "--port", str(port_no), "--work-dir", work + "/w"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port_no}/api/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit("serve.py did not start:\n" + Path(log.name).read_text()[-3000:])
                time.sleep(0.5)
        status, _ = post(port_no, "study.zip", study)
        assert status == 201, status
        idle = rss_mb(proc.pid)
        print(f"idle server after one study: {idle:.0f} MB RSS")
        with zipfile.ZipFile(__import__("io").BytesIO(study)) as z:
            members = {m: z.read(m) for m in z.namelist()}
        deflated = zip_of({**members, "BOMB.dcm": deflate_bomb(int(args.deflate_gib * 1024))}, zipfile.ZIP_STORED)
        payloads = {  # made before the clock starts
            "zip bomb: 1,500 x 1 MiB of zeros": ("bomb.zip", zip_bomb(1500)),
            "zip bomb: 1,500 x (DICM + 1 MiB of zeros)": ("bomb.zip", zip_bomb(1500, dicom_like=True)),
            "zip bomb: 60 x 1 MiB (the issue's repro)": ("bomb.zip", zip_of(
                {f"z/{i:03d}": bytes(1 << 20) for i in range(60)})),
            "zip bomb: 4,000 x 1 MiB (4 GB written before)": ("bomb.zip", zip_bomb(4000)),
            f"deflate bomb: one file inflating to {args.deflate_gib:g} GiB ({len(deflated) >> 20} MB zipped) "
            "in the study": ("study.zip", deflated),
        }
        cases = {what: (lambda name=name, data=data: post(port_no, name, data)) for what, (name, data) in payloads.items()}
        cases.update({
            f"chunked bypass: Content-Length 10 + chunked, {args.chunked_gib:g} GiB": lambda: chunked(
                port_no, args.chunked_gib, True),
            f"chunked without a length, {args.chunked_gib:g} GiB": lambda: chunked(port_no, args.chunked_gib, False),
        })
        for what, send in cases.items():
            before = rss_mb(proc.pid)
            t0 = time.time()
            with Peak(proc.pid) as peak:
                status, text = send()
            print(f"{what}: HTTP {status} in {time.time() - t0:.1f} s, peak RSS {peak.peak:.0f} MB = "
                  f"{peak.peak - idle:+.0f} MB above idle ({peak.peak - before:+.0f} above the start of the case)"
                  f"  [{' '.join(text.split())[:100]}]", flush=True)
        status, _ = post(port_no, "study.zip", study)
        print(f"a valid study afterwards: HTTP {status}; server RSS {rss_mb(proc.pid):.0f} MB")
    finally:
        stop(proc, timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
