"""The DICOM node's parts without a PACS or a model: the spool, the caps, the outbox's retries.

(tests/test_node.py runs the whole node against a real Orthanc.)
"""
from __future__ import annotations

import io
import json
import time

import pydicom
import pytest

from node.config import Caller, Destination, NodeCfg
from node.deliver import Outbox
from node.scp import OUT_OF_RESOURCES
from node.service import DicomNode
from node.spool import Spool, sr_uids


def config(tmp_path, **kw) -> NodeCfg:
    return NodeCfg(callers=[Caller("PACS")], destinations=[Destination("PACS", "127.0.0.1", 1)],
                   work_dir=str(tmp_path / "work"), **kw)


def test_the_spool_stores_each_instance_once_and_knows_what_is_answered(tmp_path):
    spool = Spool(tmp_path)
    key, new = spool.add("1.2", "1.2.3", "1.2.3.1", b"a")
    assert new and spool.add("1.2", "1.2.3", "1.2.3.1", b"a") == (key, False)  # sent twice: stored once
    _, new = spool.add("1.2", "1.2.3", "1.2.3.2", b"b")
    assert new and len(spool.instances(key)) == 2 and len(spool.unanswered(key)) == 2
    spool.answer(key, spool.instances(key), {"study": "1.2", "series": "9", "sop": "9.1", "class": "x"})
    assert spool.unanswered(key) == [] and spool.state(key)["srs"][0]["sop"] == "9.1"
    spool.add("1.2", "1.2.3", "1.2.3.3", b"c")  # a late instance
    assert [p.name for p in spool.unanswered(key)] == [p.name for p in spool.instances(key)
                                                        if p.stem not in spool.state(key)["answered"]]
    assert len(spool.unanswered(key)) == 1
    assert "1.2.3" not in " ".join(p.name for p in (tmp_path / "spool").rglob("*"))  # no UIDs in names
    # the SR's UIDs: the same instances, the same UIDs; one more instance, new ones
    first = sr_uids(key, spool.instances(key)[:2])
    assert first == sr_uids(key, list(reversed(spool.instances(key)[:2])))
    assert first != sr_uids(key, spool.instances(key)) and all(pydicom.uid.UID(u).is_valid for u in first)


def test_a_restart_finds_what_was_not_answered(tmp_path):
    cfg = config(tmp_path)
    node = DicomNode(cfg, run=None, model={})
    assert node.receive("1.2", "1.2.3", "1.2.3.1", b"x" * 10) == 0
    assert node.receive("1.2", "1.2.4", "1.2.4.1", b"y" * 10) == 0
    key = next(iter(node.pending))
    node.spool.answer(key, node.spool.instances(key), None)
    again = DicomNode(cfg, run=None, model={})  # as after a kill -9
    assert set(again.pending) == set(node.pending) - {key} and again.spool_bytes == 20


def test_instances_past_the_caps_are_refused_out_of_resources(tmp_path):
    node = DicomNode(config(tmp_path, max_series_files=2, max_spool_mb=1), run=None, model={})
    assert [node.receive("1.2", "1.2.3", f"1.2.3.{i}", b"x") for i in range(3)] == [0, 0, OUT_OF_RESOURCES]
    assert node.receive("1.2", "1.2.5", "1.2.5.1", b"x" * (1 << 20)) == OUT_OF_RESOURCES  # the spool's cap
    assert node.receive("1.2", "1.2.3", "1.2.3.0", b"x") == 0  # the same instance again: no new file
    assert len(list((tmp_path / "work" / "spool").rglob("*.dcm"))) == 2
    # answered series make room before an instance is refused
    key = next(iter(node.pending))
    node.spool.answer(key, node.spool.instances(key), None)
    del node.pending[key]
    assert node.receive("1.2", "1.2.5", "1.2.5.1", b"x" * ((1 << 20) - 1)) == 0
    assert not node.spool.folder(key).exists()


def _sr_bytes() -> bytes:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.ComprehensiveSRStorage, pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("failures, delivered", [(2, True), (10, False)])
def test_the_outbox_retries_with_backoff_then_keeps_what_it_could_not_send(tmp_path, monkeypatch, failures,
                                                                            delivered):
    cfg = config(tmp_path, retries=3, backoff_seconds=0.05, webhook_url="http://127.0.0.1:1/hook")
    outbox = Outbox(tmp_path / "work", cfg)
    sent, tries = [], []

    def send(target, ds, notice):
        tries.append((target, time.time()))
        if len([t for t in tries if t[0] == target]) <= failures:
            raise OSError("connection refused")
        sent.append((target, ds.SOPInstanceUID, notice["study"]))

    monkeypatch.setattr(outbox, "_send", send)
    outbox.put("abc-1", _sr_bytes(), {"study": "1.2"})
    deadline = time.time() + 10
    while outbox.pending() and time.time() < deadline:
        time.sleep(outbox.run_once() / 4)
    assert outbox.pending() == 0
    if delivered:
        assert [t for t, _, _ in sent] == ["dimse:0", "webhook"]  # the SR first, then the notice
        assert not list((tmp_path / "work" / "failed").iterdir()) and not list(outbox.dir.iterdir())
        waits = [b[1] - a[1] for a, b in zip(tries, tries[1:3])]
        assert waits[1] >= 2 * 0.05 * 0.9 and waits[0] >= 0.05 * 0.9  # the backoff doubles
    else:
        assert sent == [] and len(tries) == cfg.retries + 1
        kept = sorted(p.name for p in (tmp_path / "work" / "failed").iterdir())
        assert kept == ["abc-1.dcm", "abc-1.json"]
        assert json.loads((tmp_path / "work" / "failed" / "abc-1.json").read_text())["targets"] == ["dimse:0", "webhook"]


def _scheduled(node: DicomNode, feed, seconds: float = 5) -> float:
    """Run the node's scheduler while feed(i) sends instances; -> seconds until a series was queued."""
    import threading
    thread = threading.Thread(target=node._schedule, daemon=True)
    thread.start()
    t0, i = time.monotonic(), 0
    try:
        while node.queue.empty() and time.monotonic() - t0 < seconds:
            feed(i)
            i += 1
            time.sleep(0.05)
        return time.monotonic() - t0
    finally:
        node.stopping.set()
        thread.join()


def test_a_series_is_complete_after_the_quiet_window_or_the_longest_wait(tmp_path):
    quiet = DicomNode(config(tmp_path / "a", quiet_seconds=0.6, max_wait_seconds=30), run=None, model={})
    took = _scheduled(quiet, lambda i: i < 5 and quiet.receive("1.2", "1.2.3", f"1.2.3.{i}", b"x"))
    assert 0.2 + 0.6 <= took < 3  # the last of five instances 50 ms apart at 0.2 s, then the quiet window
    busy = DicomNode(config(tmp_path / "b", quiet_seconds=0.6, max_wait_seconds=1.5), run=None, model={})
    took = _scheduled(busy, lambda i: busy.receive("1.2", "1.2.3", f"1.2.3.{i}", b"x"))  # never quiet
    assert 1.5 <= took < 4 and busy.queue.get_nowait() == next(iter(busy.queued))


def test_the_queue_in_front_of_the_model_is_bounded(tmp_path):
    node = DicomNode(config(tmp_path, quiet_seconds=0.2, max_queued=1), run=None, model={})
    for series in ("1.2.3", "1.2.4"):
        node.receive("1.2", series, f"{series}.1", b"x")
    _scheduled(node, lambda i: None)
    time.sleep(0.1)
    assert node.queue.qsize() == 1 and len(node.pending) == 1  # the other waits on disk, not in memory


def test_a_failing_series_is_tried_again_then_left_for_the_next_start(tmp_path, caplog, monkeypatch):
    import threading

    import node.service as service
    calls = []

    def run(files):
        calls.append(files)
        raise RuntimeError("the model is busy")

    monkeypatch.setattr(service, "choose_series", lambda listed: listed)  # no model, no DICOM here
    monkeypatch.setattr(service, "check_chosen", lambda files, what: None)
    node = DicomNode(config(tmp_path, quiet_seconds=0.1), run=run, model={})
    node.receive("1.2", "1.2.3", "1.2.3.1", b"x")
    threads = [threading.Thread(target=t, daemon=True) for t in (node._schedule, node._work)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while len(calls) < service.MAX_TRIES and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    node.stopping.set()
    for t in threads:
        t.join()
    assert len(calls) == service.MAX_TRIES  # tried again, then left alone
    assert "until the next start" in caplog.text and not node.pending
    assert DicomNode(config(tmp_path), run=None, model={}).pending  # the next start takes it up again
