"""The web application's JSON API (FastAPI TestClient): results equal the batch path, every output,
hostile uploads answered with a clear error while the server keeps serving, nothing left on disk."""
import io
import json
import logging
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


def leftovers() -> set:
    tmp = Path(tempfile.gettempdir())
    return set(tmp.glob("ich_upload_*")) | set(tmp.glob("ich_study_*"))


@pytest.fixture(scope="module")
def engine(study_models):
    from web.engine import load_engine
    settings, cfg, _ = study_models
    return load_engine(settings, cfg)


@pytest.fixture(scope="module")
def client(engine):
    from web.app import create_app
    return TestClient(create_app(engine, max_upload_mb=64, max_studies=4))


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
    assert re.search(r'filename="ich_[A-Za-z0-9]{8}_\d{8}\.csv"', csv.headers["content-disposition"])
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


def test_hostile_uploads_get_a_clear_error_and_the_server_keeps_serving(client, study, monkeypatch):
    import ich.study
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

    monkeypatch.setattr(ich.study, "MAX_BYTES", 1 << 20)  # a zip bomb, at a cap the test can reach quickly
    bomb = post(client, ("bomb.zip", zipped({"big": b"\0" * (3 << 20)})))
    assert bomb.status_code == 400 and "unpacks to more than" in bomb.json()["error"]
    monkeypatch.undo()

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


def _sr_counts(data: bytes) -> dict:
    """The SR's summary counts of slices at or above its threshold, by concept code (ICHN, SDHN, ...)."""
    import highdicom as hd
    sr = hd.sr.srread(io.BytesIO(data))
    [summary] = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "study summary"]
    return {m.name.value: int(m.value) for m in summary.get_measurements() if m.name.value.endswith("N")}


def test_every_download_takes_the_threshold_and_a_result_tag(client, study):
    """Issue 20, items 1, 9, 10: ?threshold= into every output (else a 400), a valid SR from Kaggle-style
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
    assert names == {"csv": f'attachment; filename="{tag}.csv"', "kaggle_csv": f'attachment; filename="{tag}_kaggle.csv"',
                     "json": f'attachment; filename="{tag}.json"', "sr": f'attachment; filename="{tag}_sr.dcm"'}
    assert not any(i in v for i in ids for v in names.values())


def test_viewer_endpoints_source_hu_header_patient_and_recent(client, study, prepared):
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
    assert [s["thumbnail"] for s in doc["series"]] == [True, True]  # every series has its picture
    for s in doc["series"]:
        thumb = client.get(f"/api/studies/{sid}/series/{s['index']}/thumbnail.png")
        assert cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    assert client.get(f"/api/studies/{sid}/series/9/thumbnail.png").status_code == 404
    who = client.get(f"/api/studies/{sid}/patient").json()
    assert set(who) == {"patient_name", "patient_id"} and who["patient_id"]
    listed = client.get("/api/studies").json()["studies"]
    assert listed[0]["id"] == sid and listed[0]["n_slices"] == len(ids) and listed[0]["tag"] == doc["tag"]
    assert who["patient_id"] not in json.dumps(listed) + json.dumps(doc)
