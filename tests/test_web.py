"""The web application's JSON API (FastAPI TestClient): results equal the batch path, every output,
hostile uploads answered with a clear error while the server keeps serving, nothing left on disk."""
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import sr_problems, study_zip
from ich.labels import LABELS
from ich.study import STUDY_REASONS

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


WORK = Path(tempfile.gettempdir()) / f"ich-serve-{os.getuid()}"  # the app's default folder for uploads


def leftovers() -> set:
    """What the server keeps of its uploads: everything goes under its own folder (not /tmp's top,
    where other programs' and other test runs' files come and go)."""
    return set(WORK.glob("*"))


@pytest.fixture(scope="module")
def engine(study_models):
    from web.engine import load_engine
    settings, cfg, _ = study_models
    return load_engine(settings, cfg)


@pytest.fixture(scope="module")
def client(engine):
    from web.app import create_app
    return TestClient(create_app(engine, max_upload_mb=64, max_studies=4), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def study(prepared, tmp_path_factory):
    return study_zip(prepared, tmp_path_factory.mktemp("web") / "study.zip")


def post(client, *files, **params):
    return client.post("/api/studies", params=params,
                       files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def test_upload_gives_the_batch_paths_probabilities_and_every_output(client, study, study_models, caplog):
    zpath, ids = study
    _, _, root = study_models
    before = leftovers()
    with caplog.at_level(logging.INFO, logger="ich.web"):
        r = post(client, ("study.zip", zpath.read_bytes()))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert "Research use only" in doc["notice"]
    got = pd.DataFrame(doc["slices"])
    assert got["slice_index"].tolist() == sorted(got["slice_index"]) and len(got) == len(ids)
    want = pd.read_parquet(root / "models" / "stacking" / "study" / "test.parquet").set_index("image_id")
    np.testing.assert_allclose(got[list(LABELS)].to_numpy(), want.loc[ids, list(LABELS)].to_numpy(), atol=1e-5)
    assert got["file"].tolist() == [f"PATIENT/SER1/IM{i:04d}" for i in range(len(ids))]
    reasons = {s["file"]: s["reason"] for s in doc["skipped"]}
    assert reasons["PATIENT/README.txt"] == "not_dicom" and set(reasons.values()) <= set(STUDY_REASONS)
    assert [s["chosen"] for s in doc["series"]] == [True, False]
    assert set(doc["timings_s"]) >= {"upload", "read", "prepare", "stage one", "stage two", "total"}
    assert doc["model"]["experiments"] == ["tiny"] and doc["model"]["oof_score"] > 0
    assert leftovers() <= before  # the upload's folder is gone
    assert not any(i in caplog.text for i in ids)  # no UID in the log

    sid = doc["id"]
    assert client.get(f"/api/studies/{sid}").json()["slices"] == doc["slices"]
    csv = client.get(f"/api/studies/{sid}/download/csv")
    assert csv.status_code == 200 and csv.text.startswith("# Research use only")
    assert re.search(r'filename="ich_[A-Za-z0-9]{8}_\d{8}_t0\.50\.csv"', csv.headers["content-disposition"])
    table = pd.read_csv(io.StringIO(csv.text), comment="#")
    np.testing.assert_allclose(table[list(LABELS)].to_numpy(), got[list(LABELS)].to_numpy(), atol=1e-5)
    kaggle = pd.read_csv(io.StringIO(client.get(f"/api/studies/{sid}/download/kaggle_csv").text), comment="#")
    assert len(kaggle) == 6 * len(ids)
    assert "Research use only" in json.loads(client.get(f"/api/studies/{sid}/download/json").content)["notice"]
    sr = pydicom.dcmread(io.BytesIO(client.get(f"/api/studies/{sid}/download/sr").content))
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    assert "Research use only" in sr.SeriesDescription

    png = client.get(f"/api/studies/{sid}/slices/0/image.png", params={"window": doc["windows"][-1]})
    image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (doc["image_size"], doc["image_size"])
    cam = client.get(f"/api/studies/{sid}/slices/{len(ids) // 2}/cam.png", params={"label": "subdural"})
    heat = cv2.imdecode(np.frombuffer(cam.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat.shape == (doc["image_size"], doc["image_size"], 4) and heat[..., 3].max() > 0
    assert client.get(f"/api/studies/{sid}/slices/999/image.png").status_code == 404
    assert client.get(f"/api/studies/{sid}/slices/0/cam.png", params={"label": "nope"}).status_code == 404
    assert client.get(f"/api/studies/{sid}/download/exe").status_code == 404
    assert client.delete(f"/api/studies/{sid}").status_code == 200
    assert client.get(f"/api/studies/{sid}").status_code == 404


def test_loose_files_and_another_series(client, prepared, study):
    zpath, ids = study
    with zipfile.ZipFile(zpath) as z:
        files = [(Path(m).name, z.read(m)) for m in z.namelist()]
    r = post(client, *files)
    assert r.status_code == 201, r.text
    assert len(r.json()["slices"]) == len(ids)
    other = post(client, *files, series=1)  # the two slices of the other series: too few for a series
    assert other.status_code == 400 and "slice" in other.json()["error"]
    assert post(client, *files, series=7).status_code == 400


def _ct_copies(n, modality="CT"):
    """n copies of pydicom's CT_small (or MR_small) as one series, each with its own instance UID."""
    source = get_testdata_file("CT_small.dcm" if modality == "CT" else "MR_small.dcm")
    out = []
    for i in range(n):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [0, 0, 5.0 * i]
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append((f"im{i}.dcm", buf.getvalue()))
    return out


def test_hostile_uploads_get_a_clear_error_and_the_server_keeps_serving(client, study):
    zpath, _ = study
    before = leftovers()

    def zipped(members):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                z.writestr(name, data)
        return buf.getvalue()

    cases = {
        "zip-slip": [("evil.zip", zipped({"../../evil.dcm": b"x"}))],
        "not DICOM": [("notes.txt", b"hello"), ("photo.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 100)],
        "MR study": _ct_copies(3, "MR"),
        "one slice": _ct_copies(1),
        "bad zip": [("study.zip", b"PK\x03\x04 not really a zip")],
        "empty file": [("empty.dcm", b"")],
    }
    for what, files in cases.items():
        r = post(client, *files)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert r.json()["error"] and "\n" not in r.json()["error"], what
    assert "unsafe path" in post(client, *cases["zip-slip"]).json()["error"]
    assert "not_ct" in post(client, *cases["MR study"]).json()["error"]

    bomb = post(client, ("bomb.zip", zipped({f"big{i}": b"\0" * (1 << 20) for i in range(80)})))
    assert bomb.status_code == 400 and "80 not_dicom" in bomb.json()["error"]

    body, headers = _multipart([("study.zip", zpath.read_bytes())])
    cut = body[: len(body) // 2]  # a truncated upload: the body ends in the middle of the file
    r = client.post("/api/studies", content=cut, headers={**headers, "content-length": str(len(cut))})
    assert r.status_code == 400 and "no complete file" in r.json()["error"]
    assert client.post("/api/studies", content=b"", headers=headers).status_code == 400  # no file at all
    big = client.post("/api/studies", content=b"x", headers={**headers, "content-length": str(65 << 20)})
    assert big.status_code == 413
    odd = client.post("/api/studies", content=b"x", headers={**headers, "content-length": "12abc"})
    assert odd.status_code == 400 and "not a number" in odd.json()["error"]

    assert post(client, ("study.zip", zpath.read_bytes())).status_code == 201  # still serving
    assert leftovers() <= before


def _multipart(files):
    boundary = "testboundary1234"
    parts = []
    for name, data in files:
        parts.append((f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_a_full_queue_is_told_to_come_back(client, study, engine):
    zpath, _ = study
    engine.max_waiting = 0
    try:
        r = post(client, ("study.zip", zpath.read_bytes()))
    finally:
        engine.max_waiting = 16
    assert r.status_code == 503 and "waiting" in r.json()["error"]


def test_the_page_is_served_with_the_notice(client):
    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    health = client.get("/api/health").json()
    assert health["ok"] and health["model"]["stage_two"] == "study"


# --- the web application under a hostile client -------------------------------------------------
# Each test reproduces one finding over HTTP (TestClient, or serve.py itself on 127.0.0.1); the hostile
# files are generated here (tests/hostile.py).

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from conftest import REPO, free_port  # noqa: E402
from hostile import damaged_zips, deflate_bomb, raw_request, stop, zip_bomb, zip_of  # noqa: E402


def _study_members(zpath):
    with zipfile.ZipFile(zpath) as z:
        return {m: z.read(m) for m in z.namelist()}


def _edited(data: bytes, edit) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_1_a_zip_bomb_inside_the_caps_is_refused_at_once_without_the_model(client, study):
    """60 entries of 1 MiB of zeros (65 kB zipped) cost 35 s of server CPU under the model's lock; 4,000
    entries wrote 4 GB. Now: no member that is no DICOM by its first bytes is written or parsed."""
    zpath, _ = study
    before = leftovers()
    for bomb in (zip_of({f"z/{i:03d}": bytes(1 << 20) for i in range(60)}), zip_bomb(4000),
                 zip_bomb(1500, dicom_like=True)):  # 'DICM' and then zeros: no file meta, no data set
        t0 = time.time()
        r = post(client, ("bomb.zip", bomb))
        seconds = time.time() - t0
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert ("no axial CT series" in error and ("not_dicom" in error or "unreadable" in error)
                or "unpacks to more than" in error), error  # 4,000 MiB: more than the cap says it unpacks to
        assert seconds < 5, f"{seconds:.1f} s for a zip bomb"
    assert leftovers() <= before
    assert post(client, ("study.zip", zpath.read_bytes())).status_code == 201


def test_1_uploads_are_capped_in_unpacked_bytes_and_in_time(engine, study):
    from web.app import create_app
    zpath, _ = study
    small = TestClient(create_app(engine, max_unpacked_mb=0, read_seconds=60), base_url="http://127.0.0.1")
    r = post(small, ("study.zip", zpath.read_bytes()))
    assert r.status_code == 400 and "unpacks to more than 0 MB" in r.json()["error"], r.text
    hurried = TestClient(create_app(engine, read_seconds=0), base_url="http://127.0.0.1")
    r = post(hurried, ("study.zip", zpath.read_bytes()))
    assert r.status_code == 400 and "took more than 0 s" in r.json()["error"], r.text


def test_2_a_deflate_bomb_is_unsupported_syntax_and_the_rest_of_the_study_is_read(client, study):
    zpath, ids = study
    members = _study_members(zpath)
    members["PATIENT/SER1/BOMB"] = deflate_bomb(256)  # 256 MiB inflated from 260 kB
    t0 = time.time()
    r = post(client, ("study.zip", zip_of(members, zipfile.ZIP_STORED)))
    assert r.status_code == 201, r.text
    assert time.time() - t0 < 30
    reasons = {s["file"]: s["reason"] for s in r.json()["skipped"]}
    assert reasons["PATIENT/SER1/BOMB"] == "unsupported_syntax"
    assert len(r.json()["slices"]) == len(ids)


def test_3_the_upload_cap_counts_the_bytes_that_arrive(client, study):
    zpath, _ = study
    body, headers = _multipart([("study.zip", zpath.read_bytes()), ("pad.bin", bytes(65 << 20))])
    r = client.post("/api/studies", content=body, headers={**headers, "content-length": "10"})
    assert r.status_code == 413 and "larger than 64 MB" in r.json()["error"]
    body, headers = _multipart([("study.zip", zpath.read_bytes())])

    def chunks():
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]
    r = client.post("/api/studies", content=chunks(), headers={**headers, "content-length": "10",
                                                               "transfer-encoding": "chunked"})
    assert r.status_code == 400 and "Transfer-Encoding" in r.json()["error"], r.text


def test_3_chunked_with_a_small_content_length_on_the_real_server(served, study):
    url, _, _ = served
    zpath, _ = study
    body, headers = _multipart([("study.zip", zpath.read_bytes())])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                       for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    port = int(url.rsplit(":", 1)[1])
    head = (f"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {headers['content-type']}\r\n"
            "Content-Length: 10\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    reply, _ = raw_request("127.0.0.1", port, head + chunked, wait=60)
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"400", reply[:300]


def test_4_damaged_zips_are_a_one_line_json_400_naming_the_problem_not_the_file(client, study, caplog):
    zpath, _ = study
    member = next(iter(_study_members(zpath).values()))
    with caplog.at_level(logging.DEBUG):
        for what, data in damaged_zips(member).items():
            r = post(client, ("study.zip", data))
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (what, r.text)
            error = r.json()["error"]
            assert "\n" not in error and "SECRET-NAME" not in error, (what, error)
            assert "zip" in error, (what, error)
    assert "SECRET-NAME" not in caplog.text and "Traceback" not in caplog.text


MARKERS = {"PatientName": "MKpatname^Doe", "PatientID": "MKpatid", "AccessionNumber": "MKaccess",
           "StudyID": "MKstudyid", "InstitutionName": "MKinstitution", "ReferringPhysicianName": "MKphysician",
           "StudyInstanceUID": "ID_MKstudyuid", "SeriesInstanceUID": "ID_MKseriesuid",
           "StudyDescription": "MKstudydesc", "SeriesDescription": "MKseriesdesc", "PatientBirthDate": "19011231",
           "OperatorsName": "MKoperator", "StationName": "MKstation"}


def test_5_no_identifier_reaches_the_log(served, prepared, study):
    """Markers in every identifying field and in the file names; every endpoint, every download; the log
    of serve.py, its stderr included (the fixture writes both), holds none of them (highdicom logged a
    SOPInstanceUID on each SR download, and warned with a one-part PatientName on stderr)."""
    url, _, log = served
    zpath, ids = study
    members = {}
    for i, (name, data) in enumerate(sorted(_study_members(zpath).items())):
        if "SER1" not in name:
            continue

        def mark(ds, i=i):
            for key, value in MARKERS.items():
                setattr(ds, key, value)
            ds.SOPInstanceUID = f"ID_MKsop{i:04d}"
        members[f"MKfolder/MKfile{i:04d}.dcm"] = _edited(data, mark)
    members["MKfolder/MKnotes.txt"] = b"MKtext"
    import httpx
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.get("/").status_code == 200 and c.get("/api/health").status_code == 200
        r = c.post("/api/studies", files={"files": ("MKupload.zip", zip_of(members))})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert c.get(f"/api/studies/{sid}").status_code == 200
        for kind in ("csv", "kaggle_csv", "json", "sr"):
            got = c.get(f"/api/studies/{sid}/download/{kind}")
            assert got.status_code == 200 and got.content, kind
        assert c.get(f"/api/studies/{sid}/slices/1/image.png").status_code == 200
        assert c.get(f"/api/studies/{sid}/slices/1/cam.png", params={"label": "any"}).status_code == 200
        assert c.post("/api/studies", params={"series": 3},
                      files={"files": ("MKupload.zip", zip_of(members))}).status_code == 400
        for data in damaged_zips(next(iter(members.values()))).values():  # errors must not log names either
            assert c.post("/api/studies", files={"files": ("MKbad.zip", data.replace(b"SECRET-NAME",
                                                                                       b"MKzipmember"))}).status_code == 400
        assert c.post("/api/studies", files={"files": ("MKloose.dcm", b"MKjunk" * 10)}).status_code == 400
        assert c.delete(f"/api/studies/{sid}").status_code == 200

        def odd(ds):  # a one-part name (highdicom warns with it) and a date pydicom warns about, with its value
            ds.PatientName, ds.StudyDate, ds.PatientBirthDate = "MKsolo", "1901-12-30", "1901.12.29"
        r = c.post("/api/studies", files={"files": ("MKodd.zip", zip_of({k: _edited(v, odd)
                                                                          for k, v in members.items()
                                                                          if k.endswith(".dcm")}))})
        assert r.status_code == 201, r.text
        for kind in ("sr", "json", "csv"):
            assert c.get(f"/api/studies/{r.json()['id']}/download/{kind}").status_code == 200
    time.sleep(0.5)
    text = log.read_text()
    markers = [v.split("^")[0] for v in MARKERS.values()] + ["MKsop", "MKfolder", "MKfile", "MKnotes", "MKtext",
                                                             "MKupload", "MKbad", "MKzipmember", "MKloose", "MKjunk",
                                                             "MKsolo", "MKodd", "1901-12-30", "1901.12.29"]
    found = [m for m in (*markers, *ids) if m in text]
    assert not found, f"identifiers in the log: {found}: {text[-2000:]}"


def _kill_on_exit(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=20)


def _start(study_models, port, log, *args):
    settings, cfg, _ = study_models
    out = open(log, "a")
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--settings", str(settings), "--config",
                             str(cfg), "--port", str(port), "--max-upload-mb", "64", *map(str, args)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    import urllib.request
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            _kill_on_exit(proc)
            raise AssertionError(f"serve.py did not start: {Path(log).read_text()[-3000:]}")
        time.sleep(0.3)


def test_6_and_10_kill_9_mid_upload_leaves_nothing_after_a_restart_and_slow_clients_are_cut_off(
        study_models, study, tmp_path):
    zpath, _ = study
    work, log, port = tmp_path / "work", tmp_path / "serve.log", free_port()
    proc = _start(study_models, port, log, "--work-dir", work)
    try:
        assert (work.stat().st_mode & 0o777) == 0o700
        body, headers = _multipart([("study.zip", zpath.read_bytes())])
        import socket
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall((f"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                   f"{headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                  + body[: len(body) // 2])
        deadline = time.time() + 20
        while not list(work.glob("req_*/00000")) and time.time() < deadline:
            time.sleep(0.1)
        assert list(work.glob("req_*/00000")), "the upload never reached the server's folder"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
        s.close()
        assert list(work.glob("req_*")), "kill -9 should have left the request's folder (the repro)"
    finally:
        _kill_on_exit(proc)
    proc = _start(study_models, port, log, "--work-dir", work, "--allow-host", "ich.example",
                  "--header-timeout", 1, "--body-timeout", 2)
    try:
        assert not list(work.iterdir()), list(work.iterdir())  # swept at start-up
        import httpx
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/api/health", headers={"Host": "ich.example"}).status_code == 200
            assert c.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
        # headers that stop half-way: the connection is closed, not held for good
        reply, seconds = raw_request("127.0.0.1", port, b"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nConte",
                                     wait=15)
        assert seconds < 8, f"a half-sent request head held a connection for {seconds:.1f} s"
        # a body that stalls: 408 after --body-timeout
        head = (f"POST /api/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {headers['content-type']}"
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reply, seconds = raw_request("127.0.0.1", port, head + body[:1000], wait=15)
        assert seconds < 8 and b" 408 " in reply.split(b"\r\n", 1)[0], (seconds, reply[:200])
        assert not list(work.glob("req_*"))
    finally:
        stop(proc)


def test_7_one_odd_slice_does_not_reject_its_series(client, study):
    zpath, ids = study
    members = _study_members(zpath)
    zero, sagittal = "PATIENT/SER1/IM0003", "PATIENT/SER1/IM0005"
    members[zero] = _edited(members[zero], lambda ds: setattr(ds, "ImageOrientationPatient", [0] * 6))
    members[sagittal] = _edited(members[sagittal], lambda ds: setattr(ds, "ImageOrientationPatient",
                                                                      [0, 1, 0, 0, 0, -1]))
    r = post(client, ("study.zip", zip_of(members)))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert len(doc["slices"]) == len(ids) - 2
    reasons = {s["file"]: s["reason"] for s in doc["skipped"]}
    assert reasons[zero] == "missing_position" and reasons[sagittal] == "other_plane"
    assert set(reasons.values()) <= set(STUDY_REASONS)


def test_8_errors_give_the_reasons_and_never_a_server_path(client, study):
    zpath, ids = study
    r = post(client, ("empty.zip", zip_of({})))
    assert r.status_code == 400 and "no files" in r.json()["error"] and "reasons: )" not in r.json()["error"]
    members = {name: _edited(data, lambda ds: setattr(ds, "PixelData", ds.PixelData[:-700]))
               for name, data in _study_members(zpath).items() if "SER1" in name}
    r = post(client, ("broken.zip", zip_of(members)))
    error = r.json()["error"]
    assert r.status_code == 400 and f"{len(ids)} pixel_decode_failed (PATIENT/SER1/IM00" in error, error
    for path in ("/tmp", tempfile.gettempdir(), "rejected.csv", str(WORK)):
        assert path not in error, error
    r = post(client, ("notes.txt", b"hello"), ("photo.jpg", b"\xff\xd8\xff\xe0" + bytes(100)))
    assert "2 not_dicom (notes.txt, photo.jpg)" in r.json()["error"], r.text


SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def test_9_security_headers_everywhere_no_store_on_results_and_no_cdn_docs(client, study):
    import base64
    import hashlib
    import re
    zpath, _ = study
    r = post(client, ("study.zip", zpath.read_bytes()))
    sid = r.json()["id"]
    responses = {"upload": r, "page": client.get("/"), "health": client.get("/api/health"),
                 "static": client.get("/static/app.js"), "result": client.get(f"/api/studies/{sid}"),
                 "image": client.get(f"/api/studies/{sid}/slices/0/image.png"),
                 "missing": client.get("/api/studies/nope"), "bad upload": post(client, ("x.txt", b"x"))}
    responses.update({kind: client.get(f"/api/studies/{sid}/download/{kind}")
                      for kind in ("csv", "kaggle_csv", "json", "sr")})
    for what, resp in responses.items():
        for key, value in SECURITY.items():
            assert resp.headers.get(key) == value, (what, key, resp.headers)
        policy = resp.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, (what, policy)
        assert "http" not in policy and "*" not in policy, (what, policy)  # nothing from elsewhere
    for what in ("upload", "result", "csv", "kaggle_csv", "json", "sr", "missing"):
        assert responses[what].headers.get("cache-control") == "no-store", what
    page = responses["page"]
    for script in re.findall(r"<script>(.*?)</script>", page.text, re.S):  # the page's inline script runs
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in page.headers["content-security-policy"]
    assert client.get("/api/docs").status_code == 404
    assert client.get("/api/openapi.json").status_code == 200


def test_10_other_origins_and_host_names_are_refused(client, study):
    zpath, _ = study
    data = zpath.read_bytes()
    evil = client.post("/api/studies", files=[("files", ("s.zip", data))], headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "Origin" in evil.json()["error"]
    assert client.post("/api/studies", files=[("files", ("s.zip", data))],
                       headers={"Origin": "null"}).status_code == 403
    assert client.get("/api/health", headers={"Origin": "http://127.0.0.1:9999"}).status_code == 403
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": "evil.example:8000"}).status_code == 400
    same = client.post("/api/studies", files=[("files", ("s.zip", data))], headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 201, same.text
    assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200


def _sr_counts(data: bytes) -> dict:
    """The SR's summary counts of slices at or above its threshold, by concept code (ICHN, SDHN, ...)."""
    import highdicom as hd
    sr = hd.sr.srread(io.BytesIO(data))
    [summary] = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "study summary"]
    return {m.name.value: int(m.value) for m in summary.get_measurements() if m.name.value.endswith("N")}


def test_every_download_takes_the_threshold_and_a_result_tag(client, study):
    """?threshold= into every output (else a 400), a valid SR from Kaggle-style
    IDs, names by the result's tag, never by patient data."""
    zpath, ids = study
    doc = post(client, ("study.zip", zpath.read_bytes())).json()
    sid, table = doc["id"], pd.DataFrame(doc["slices"])
    cut = float(np.round(table["any"].median(), 3))  # some slices above, some below
    if not 0 < cut < 1:
        cut = 0.3
    base = f"/api/studies/{sid}/download"
    sr = client.get(f"{base}/sr", params={"threshold": cut})
    assert sr.status_code == 200
    raw = pydicom.dcmread(io.BytesIO(sr.content))
    assert _sr_counts(sr.content)["ICHN"] == int((table["any"] >= cut).sum())
    assert f"threshold={cut:g}".encode() in sr.content  # the algorithm's parameters
    assert sr_problems(sr.content) == []  # dsrdump and dciodvfy read it (the study's IDs are ID_<hex>)
    assert raw.StudyInstanceUID.startswith("2.25.") and ids[0].encode() in sr.content  # mapped, the original kept
    assert _sr_counts(client.get(f"{base}/sr").content)["ICHN"] == int((table["any"] >= 0.5).sum())

    js = client.get(f"{base}/json", params={"threshold": cut}).json()
    assert js["threshold"] == cut
    assert js["above_threshold"]["any"]["slices"] == int((table["any"] >= cut).sum())
    assert client.get(f"{base}/json").json()["threshold"] == 0.5
    csv = client.get(f"{base}/csv", params={"threshold": cut}).text
    assert csv.splitlines()[1].startswith(f"# threshold {cut:g}:")
    assert f"# threshold {cut:g}:" in client.get(f"{base}/kaggle_csv", params={"threshold": cut}).text

    for bad in ("0", "1", "1.5", "-0.1", "abc", "nan", "inf", ""):
        r = client.get(f"{base}/json", params={"threshold": bad})
        assert r.status_code == 400 and "between 0 and 1" in r.json()["error"], bad

    tag = doc["tag"]
    assert re.fullmatch(r"ich_[A-Za-z0-9]{1,8}_\d{8}", tag) and tag[4:].split("_")[0] in sid.replace("-", "").replace("_", "")
    names = {kind: client.get(f"{base}/{kind}").headers["content-disposition"] for kind in ("csv", "kaggle_csv", "json", "sr")}
    assert names == {"csv": f'attachment; filename="{tag}_t0.50.csv"',
                     "kaggle_csv": f'attachment; filename="{tag}_t0.50_kaggle.csv"',
                     "json": f'attachment; filename="{tag}_t0.50.json"', "sr": f'attachment; filename="{tag}_t0.50_sr.dcm"'}
    named = client.get(f"{base}/csv", params={"threshold": 0.3})
    assert f'filename="{tag}_t0.30.csv"' in named.headers["content-disposition"]
    cut_table = pd.read_csv(io.StringIO(named.text), comment="#")
    assert (cut_table["threshold"] == 0.3).all()  # the threshold is a column of the per-slice CSV too
    assert not any(i in v for i in ids for v in names.values())


def test_viewer_endpoints_source_hu_header_thumbnails_patient(client, study, prepared):
    from ich.dicom import read_hu
    zpath, ids = study
    doc = post(client, ("study.zip", zpath.read_bytes())).json()
    sid = doc["id"]
    head = doc["study"]
    assert head["n_slices"] == len(ids) and head["source_size"] and "patient" not in json.dumps(head).lower()
    assert [w["name"] for w in doc["window_levels"]] == doc["windows"] and doc["source_images"]
    row = len(ids) // 2
    png = client.get(f"/api/studies/{sid}/slices/{row}/hu.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    bgr = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_UNCHANGED)
    hu = bgr[..., 2].astype(np.int32) * 256 + bgr[..., 1] - 32768
    _, want = read_hu(prepared / "raw" / "stage_2_test" / f"{ids[row]}.dcm")
    assert hu.shape == want.shape == tuple(head["source_size"])
    np.testing.assert_allclose(hu, np.rint(want), atol=0.51)
    assert client.get(f"/api/studies/{sid}/slices/999/hu.png").status_code == 404
    # the chosen series has its picture; the other one (2 slices) is no usable series and says why
    assert [s["thumbnail"] for s in doc["series"]] == [True, False]
    assert [s["usable"] for s in doc["series"]] == [True, False] and "slice" in doc["series"][1]["reason"]
    for s in doc["series"][:1]:
        thumb = client.get(f"/api/studies/{sid}/series/{s['index']}/thumbnail.png")
        assert cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    assert client.get(f"/api/studies/{sid}/series/9/thumbnail.png").status_code == 404
    who = client.get(f"/api/studies/{sid}/patient").json()
    assert set(who) == {"patient_name", "patient_id"} and who["patient_id"]
    assert who["patient_id"] not in json.dumps(doc)
    assert client.get("/api/studies").status_code in (404, 405)  # no list of the results' ids: each id is a key


def test_uploads_are_read_and_decoded_in_a_process_of_their_own(engine, client, study, monkeypatch):
    """An upload's files are read, sorted out and decoded by prepare_data's decode_files in a process started
    for that upload (web.reader), never in the server's process: patched here, it is never called; and the
    engine keeps no idle decode workers of its own."""
    import web.reader
    assert engine.engine.decoder.num_workers == 0
    calls = []
    monkeypatch.setattr(web.reader, "decode_files", lambda *a, **k: calls.append(1))
    zpath, ids = study
    r = post(client, ("study.zip", zpath.read_bytes()))
    assert r.status_code == 201, r.text
    assert calls == []  # patched here, in this process: the upload's own process did the decoding
    assert len(r.json()["slices"]) == len(ids)
