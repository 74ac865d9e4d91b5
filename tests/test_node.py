"""The DICOM node (dicom_node.py) against a real PACS: Debian's Orthanc with its DICOMweb plugin.

One Orthanc (a temporary JSON config, its own ports on 127.0.0.1) and one node process serve the
whole module; studies are generated with valid UIDs (python -m synthetic --dicom-uids), pushed to
Orthanc over REST, sent to the node by Orthanc (`/modalities/ich/store`), and the SRs are looked for
in Orthanc by QIDO-RS. The node runs the tiny trained pipeline of conftest (study_models). Skips with
a message where Orthanc is not installed (bash scripts/install_orthanc.sh; .ci/run does it).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import REPO
from ich.labels import LABELS
from orthanc import MISSING, Node, Orthanc

QUIET = 0.7  # the node's quiet window here (5 s by default)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}: the DICOM node was not tested")


class Hook:
    """A webhook receiver: the JSON bodies POSTed to it."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ich"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hook():
    receiver = Hook()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def pacs(study_models, hook, tmp_path_factory):
    """(Orthanc, the node, the generated studies' test folder) for the module."""
    from synthetic import generate_dataset
    root = tmp_path_factory.mktemp("node")
    generate_dataset(root / "data", n_train_patients=1, n_test_patients=10, image_size=64, seed=11, n_jobs=1,
                     n_corrupt=0, progress=False, dicom_uids=True)
    orthanc = Orthanc(root)
    settings, cfg, _ = study_models
    node = Node(root, settings, cfg, orthanc, quiet=QUIET, web=True)  # the web app beside it
    try:
        node.start(webhook_url=hook.url)
        yield orthanc, node, root / "data" / "stage_2_test"
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
        orthanc.stop()


def series_files(folder: Path) -> list[list[Path]]:
    """The test split's series, each a list of files in z order, longest first (a fresh read each time)."""
    by = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by.setdefault(ds.SeriesInstanceUID, []).append((float(ds.ImagePositionPatient[2]), path))
    return [[p for _, p in sorted(v)] for v in sorted(by.values(), key=len, reverse=True)]


_TAKEN: set = set()


def a_series(folder: Path) -> list[Path]:
    """A series of the test split no earlier test used (each test its own study)."""
    for files in series_files(folder):
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        if study not in _TAKEN:
            _TAKEN.add(study)
            return files
    raise AssertionError("the generated test split has too few studies for this module")


def uid_of(path: Path, key: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(key))


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The SR's slice groups (not the summary)."""
    container = next(i for i in sr.ContentSequence if i.ValueType == "CONTAINER")
    return [g for g in container.ContentSequence if g.ContentSequence[0].TextValue != "study summary"]


def per_slice(sr: pydicom.Dataset) -> pd.DataFrame:
    """The SR's probabilities per referenced instance."""
    from pipeline.sr import PROBABILITY
    code = {PROBABILITY[lab].value: lab for lab in LABELS}
    rows = {}
    for g in groups(sr):
        items = g.ContentSequence
        sop = next(i for i in items if i.ValueType == "IMAGE").ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        rows[sop] = {code[i.ConceptNameCodeSequence[0].CodeValue]: float(i.MeasuredValueSequence[0].FloatingPointValue)
                     for i in items if i.ValueType == "NUM"}
    return pd.DataFrame.from_dict(rows, orient="index")[list(LABELS)]


def comments(sr: pydicom.Dataset) -> str:
    def walk(item):
        yield item
        for child in item.get("ContentSequence", []):
            yield from walk(child)
    return " ".join(str(i.TextValue) for i in walk(sr) if i.get("ValueType") == "TEXT")


def test_a_study_sent_by_the_pacs_comes_back_as_an_sr_in_its_study(pacs, study_models, hook, tmp_path):
    orthanc, node, folder = pacs
    files = a_series(folder)
    study = uid_of(files[0])
    orthanc.send(orthanc.upload(files))
    [item] = orthanc.wait_srs(study, 1)
    sr = orthanc.sr(study, item)
    assert sr.StudyInstanceUID == study  # valid source UIDs: the SR lands in the source study
    got = per_slice(sr)
    assert set(got.index) == {uid_of(p, "SOPInstanceUID") for p in files}  # every used instance referenced
    refs = [r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence]
    assert sorted(refs) == sorted(got.index)
    # the same probabilities as predict.py --study on the same files
    src = tmp_path / "study"
    src.mkdir()
    for p in files:
        shutil.copy(p, src / p.name)
    settings, cfg, _ = study_models
    out = subprocess.run([sys.executable, str(REPO / "predict.py"), "--settings", str(settings), "--config", str(cfg),
                          "--study", str(src), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    want = pd.read_csv(next((tmp_path / "out").glob("*.csv")), comment="#").set_index("image_id")[list(LABELS)]
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-6)
    assert "delivered" in node.log() and study not in node.log()  # no UIDs in the log
    # the webhook's notice
    [notice] = [n for n in hook.got if n["study"] == study]
    assert notice["series"] == uid_of(files[0], "SeriesInstanceUID") and notice["sr_sop_instance"] == sr.SOPInstanceUID
    assert notice["any_probability"] == pytest.approx(want["any"].max(), abs=1e-5)
    assert notice["above_threshold"] == bool(want["any"].max() >= 0.5) and notice["slices"] == len(files)
    # ... and its viewer link opens the result in the web app running beside the node
    assert notice["viewer"].startswith(f"{node.web_url}/?result=") and notice["viewer"] in node.log()
    shown = orthanc.http.get(f"{node.web_url}/api/studies/{notice['viewer'].split('=')[1]}").json()
    assert [s["file"] for s in shown["slices"]] and len(shown["slices"]) == len(files)
    np.testing.assert_allclose([[s[lab] for lab in LABELS] for s in shown["slices"]], got.to_numpy(), rtol=1e-6)


def test_two_studies_at_once_give_two_correct_srs(pacs, tmp_path):
    """... one of them RLE-compressed: the node takes every transfer syntax the decoder reads."""
    orthanc, _, folder = pacs
    a, b = a_series(folder), a_series(folder)
    for i, path in enumerate(b):
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
        ds.save_as(tmp_path / f"{i}.dcm")
    b = [tmp_path / f"{i}.dcm" for i in range(len(b))]
    ids = [orthanc.upload(a), orthanc.upload(b)]
    threads = [threading.Thread(target=orthanc.send, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for files in (a, b):
        study = uid_of(files[0])
        [item] = orthanc.wait_srs(study, 1)
        assert set(per_slice(orthanc.sr(study, item)).index) == {uid_of(p, "SOPInstanceUID") for p in files}


def test_a_pause_longer_than_the_quiet_window_gives_a_replacing_sr(pacs):
    orthanc, _, folder = pacs
    files = a_series(folder)
    study = uid_of(files[0])
    half = len(files) // 2
    orthanc.send(orthanc.upload(files[:half]))
    [first] = orthanc.wait_srs(study, 1)
    first = orthanc.sr(study, first)
    assert len(groups(first)) == half
    orthanc.send(orthanc.upload(files[half:]))
    found = orthanc.wait_srs(study, 2)
    assert len(found) == 2
    second = next(s for s in (orthanc.sr(study, i) for i in found) if s.SOPInstanceUID != first.SOPInstanceUID)
    assert set(per_slice(second).index) == {uid_of(p, "SOPInstanceUID") for p in files}
    [pre] = second.PredecessorDocumentsSequence
    ref = pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


def _as_mr(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.Modality, ds.SOPClassUID = "MR", pydicom.uid.MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dst)
    return dst


def _a_text_report(src: Path, dst: Path) -> Path:
    """A non-image object (a Basic Text SR) in the study of src."""
    ref = pydicom.dcmread(src, stop_before_pixels=True)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.StudyInstanceUID, pydicom.uid.generate_uid()
    ds.PatientID, ds.Modality, ds.ValueType = ref.PatientID, "OT", "CONTAINER"
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_an_mr_and_a_non_image_object_are_not_processed(pacs, tmp_path):
    orthanc, node, folder = pacs
    files = a_series(folder)
    study = uid_of(files[0])
    mr = [_as_mr(p, tmp_path / f"mr{i}.dcm") for i, p in enumerate(files[:4])]
    for i, p in enumerate(mr[1:]):  # one MR series
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = pydicom.dcmread(mr[0]).SeriesInstanceUID
        ds.save_as(p)
    other = _a_text_report(files[0], tmp_path / "report.dcm")
    before = node.log().count("not processed")
    orthanc.send(orthanc.upload([*mr, other]))
    deadline = time.time() + 30
    while node.log().count("not processed") < before + 2 and time.time() < deadline:
        time.sleep(0.2)
    text = node.log()
    assert text.count("not processed") == before + 2, text[-2000:]
    assert text.count("not processed: no axial CT series found in the series: 1 file not used: 1 not_ct") >= 1
    assert text.count("not processed: no axial CT series found in the series: 4 files not used: 4 not_ct") >= 1
    assert orthanc.srs(study) == []


def test_a_corrupt_ct_slice_gets_its_rejection_reason(pacs, tmp_path):
    orthanc, _, folder = pacs
    files = a_series(folder)
    study = uid_of(files[0])
    bad = pydicom.dcmread(files[3])
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 2]  # a well-formed file with half its pixels
    bad.save_as(tmp_path / "bad.dcm")
    orthanc.send(orthanc.upload([*files[:3], tmp_path / "bad.dcm", *files[4:]]))
    [item] = orthanc.wait_srs(study, 1)
    sr = orthanc.sr(study, item)
    assert uid_of(files[3], "SOPInstanceUID") not in set(per_slice(sr).index)
    assert len(per_slice(sr)) == len(files) - 1
    assert "1 of the series' " in comments(sr) and "pixel_decode_failed" in comments(sr)


def test_an_unknown_calling_ae_is_refused_and_a_known_one_echoes(pacs):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    orthanc, node, _ = pacs
    for caller, ok in (("STRANGER", False), ("ORTHANC", True)):
        ae = AE(ae_title=caller)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", orthanc.node_port, ae_title="ICH_NODE")
        assert assoc.is_established == ok and assoc.is_rejected == (not ok)
        if ok:
            assert assoc.send_c_echo().Status == 0
            assoc.release()
    assert "'STRANGER' from 127.0.0.1 is not in callers" in node.log()
    assert orthanc.http.post("/modalities/ich/echo", json={}).status_code == 200


def test_a_dataset_without_its_uids_is_refused(pacs):
    """DICOM's refusal (0xA900) for a dataset that lacks its series UID; odd content is never refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    orthanc, node, folder = pacs
    ds = pydicom.dcmread(series_files(folder)[-1][0])
    del ds.SeriesInstanceUID
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", orthanc.node_port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0xA900
    finally:
        assoc.release()
    assert "C-STORE refused: the dataset lacks its study, series or SOP instance UID" in node.log()


def test_kill_9_with_series_queued_then_restart_every_sr_arrives_none_twice(pacs):
    orthanc, node, folder = pacs
    node.proc.kill()  # idle: nothing to lose (and no time spent on a clean stop)
    node.proc.wait()
    node.start(web=False, quiet_seconds=30)  # the series stay queued: nothing is processed before the kill
    a, b = a_series(folder), a_series(folder)
    orthanc.send(orthanc.upload(a) + orthanc.upload(b))  # synchronous: every C-STORE answered
    node.proc.kill()
    node.proc.wait()
    for files in (a, b):
        assert orthanc.srs(uid_of(files[0])) == []
    node.start(web=False, **stow_only(orthanc))  # the restarted node sends by STOW-RS (tested on its own below)
    for files in (a, b):
        study = uid_of(files[0])
        [item] = orthanc.wait_srs(study, 1)
        assert set(per_slice(orthanc.sr(study, item)).index) == {uid_of(p, "SOPInstanceUID") for p in files}
    time.sleep(3 * QUIET + 1)
    assert [len(orthanc.srs(uid_of(f[0]))) for f in (a, b)] == [1, 1]  # none twice
    assert "2 series received but not answered" in node.log()


def stow_only(orthanc: Orthanc) -> dict:
    return {"destinations": [], "stow_url": f"{orthanc.url}/dicom-web"}


def test_stow_rs_to_the_dicomweb_plugin_works_as_c_store_does(pacs):
    orthanc, node, folder = pacs
    if node.overrides != stow_only(orthanc):  # the kill -9 test leaves the node so; alone, this restarts it
        node.stop()
        node.start(web=False, **stow_only(orthanc))
    files = a_series(folder)
    study = uid_of(files[0])
    orthanc.send(orthanc.upload(files))
    [item] = orthanc.wait_srs(study, 1)
    sr = orthanc.sr(study, item)
    assert set(per_slice(sr).index) == {uid_of(p, "SOPInstanceUID") for p in files}
    assert sr.StudyInstanceUID == study
