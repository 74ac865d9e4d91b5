"""A bounded load test on serve.py at 127.0.0.1: 8 concurrent clients x 3 studies, while a hostile client
sends zip bombs, deflate bombs and chunked bodies past the cap. Every request is answered, inference runs
one at a time (the rest queue), the hostile uploads are refused without holding the others up, the
server's memory stays bounded, nothing is left on disk and no UID reaches the log."""
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import study_zip
from hostile import deflate_bomb, raw_request, zip_of

CLIENTS, STUDIES = 8, 3


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def leftovers() -> set:
    """Everything serve.py writes goes under its --work-dir (default ich-serve-<uid> in the temporary folder)."""
    return set((Path(tempfile.gettempdir()) / f"ich-serve-{os.getuid()}").glob("*"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc")
def test_eight_clients_three_studies_each(served, prepared, tmp_path):
    url, proc, log = served
    zpath, ids = study_zip(prepared, tmp_path / "study.zip")
    data = zpath.read_bytes()
    before = leftovers()
    with httpx.Client(timeout=120) as c:  # warm: the first study and the CAM models are loaded
        assert c.post(url + "/api/studies", files={"files": ("s.zip", data)}).status_code == 201
    base = rss_mb(proc.pid)
    peak, results, stop = [base], [], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(rss_mb(proc.pid))
            time.sleep(0.1)

    def client(k):
        with httpx.Client(timeout=300) as c:
            for _ in range(STUDIES):
                r = c.post(url + "/api/studies", files={"files": (f"s{k}.zip", data)})
                results.append((r.status_code, r.json()))

    hostile = []

    def attacker():
        import zipfile
        with zipfile.ZipFile(zpath) as z:
            members = {m: z.read(m) for m in z.namelist()}
        bombs = {"zip bomb": zip_of({f"z/{i:03d}": bytes(1 << 20) for i in range(60)}),
                 "deflate bomb": zip_of({**members, "BOMB.dcm": deflate_bomb(256)}, zipfile.ZIP_STORED)}
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(timeout=300) as c:
            for _ in range(2):
                for what, bomb in bombs.items():
                    r = c.post(url + "/api/studies", files={"files": ("b.zip", bomb)})
                    hostile.append((what, r.status_code, r.json()))
                body = b"x" * (1 << 20)  # refused from its headers: the body is never read
                reply, _ = raw_request("127.0.0.1", port, (
                    f"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                    "boundary=b\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), wait=60)
                hostile.append(("chunked", int(reply.split()[1]) if reply else 0, None))

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)] + [threading.Thread(target=attacker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.time() - t0
    stop.set()
    watcher.join()

    assert len(results) == CLIENTS * STUDIES
    assert [s for s, _ in results] == [201] * len(results), [d for s, d in results if s != 201][:3]
    assert all(len(d["slices"]) == len(ids) for _, d in results)
    assert len(hostile) == 6, hostile
    for what, status, doc in hostile:
        if what == "deflate bomb":  # the study is read; the bomb is listed
            assert status == 201 and {"file": "BOMB.dcm", "reason": "unsupported_syntax"}.items() <= next(
                s for s in doc["skipped"] if s["file"] == "BOMB.dcm").items(), doc
        else:
            assert status == 400, (what, status, doc)
    queued = sorted(d["timings_s"]["queue"] for _, d in results)
    assert queued[-1] > 0  # they did wait for each other: one inference at a time
    assert proc.poll() is None  # still serving
    # memory: results are kept for the last --max-studies (8) only, each a few MB here
    assert max(peak) - base < 400, f"server memory grew from {base:.0f} MB to {max(peak):.0f} MB"
    assert leftovers() <= before
    text = log.read_text()
    assert not any(i in text for i in ids)
    print(f"\n{CLIENTS} clients x {STUDIES} studies of {len(ids)} slices: {seconds:.1f} s, "
          f"server memory {base:.0f} -> peak {max(peak):.0f} MB, longest queue wait {queued[-1]:.1f} s")
