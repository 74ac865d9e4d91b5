"""A real PACS for the DICOM node's tests and benchmark: Debian's Orthanc with its DICOMweb plugin, started
from a temporary JSON config on free ports of 127.0.0.1, and dicom_node.py as a user starts it.

Used by tests/test_node.py and benchmarks/node.py (bash scripts/install_orthanc.sh installs Orthanc).
"""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
ORTHANC = shutil.which("Orthanc")
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MISSING = None if ORTHANC and DICOMWEB.exists() else (
    "Orthanc and its DICOMweb plugin are not installed (bash scripts/install_orthanc.sh, or apt-get install "
    "orthanc orthanc-dicomweb)")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, root: Path):
        import httpx
        self.http_port, self.dicom_port, self.node_port = free_port(), free_port(), free_port()
        storage = root / "orthanc"
        storage.mkdir()
        config = {"Name": "ich-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "DicomModalities": {"ich": ["ICH_NODE", "127.0.0.1", self.node_port]},
                  "HttpServerEnabled": True, "Plugins": [str(DICOMWEB)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomScpTimeout": 10}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + 30
        while True:
            try:
                if self.http.get("/system").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"Orthanc did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def upload(self, paths) -> list[str]:
        """Files into Orthanc -> their Orthanc series ids (one per series)."""
        series = set()
        for path in paths:
            r = self.http.post("/instances", content=Path(path).read_bytes())
            r.raise_for_status()
            series.add(self.http.get(f"/instances/{r.json()['ID']}").json()["ParentSeries"])
        return sorted(series)

    def send(self, series_ids, asynchronous: bool = False):
        r = self.http.post("/modalities/ich/store", json={"Resources": list(series_ids),
                                                            "Synchronous": not asynchronous})
        r.raise_for_status()
        return r.json()

    def srs(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the SR instances in a study."""
        r = self.http.get(f"/dicom-web/studies/{study_uid}/instances", params={"Modality": "SR"})
        if r.status_code == 204 or not r.content:
            return []
        r.raise_for_status()
        return [i for i in r.json() if i.get("00080060", {}).get("Value") == ["SR"]]

    def sr(self, study_uid: str, item: dict) -> pydicom.Dataset:
        series, sop = item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
        r = self.http.get(f"/dicom-web/studies/{study_uid}/series/{series}/instances/{sop}",
                          headers={"Accept": 'multipart/related; type="application/dicom"'})
        r.raise_for_status()
        body = r.content
        start = body.index(b"DICM") - 128
        return pydicom.dcmread(io.BytesIO(body[start:]))

    def wait_srs(self, study_uid: str, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            found = self.srs(study_uid)
            if len(found) >= n or time.time() > deadline:
                return found
            time.sleep(0.3)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Node:
    """dicom_node.py as a user starts it (its log in a file), restartable with another config."""

    def __init__(self, root: Path, settings, predict_cfg, orthanc: Orthanc, quiet: float = 0.7,
                 web: bool = False):
        """web: run the web app beside the node (dicom_node.py --web-port), at self.web_url."""
        self.root, self.settings, self.predict_cfg, self.orthanc = root, settings, predict_cfg, orthanc
        self.quiet = quiet
        self.web_port = free_port() if web else None
        self.web_url = f"http://127.0.0.1:{self.web_port}" if web else None
        self.proc, self.logs, self.overrides = None, [], {}

    def config(self, **overrides) -> Path:
        import yaml
        cfg = {"ae_title": "ICH_NODE", "port": self.orthanc.node_port,
               "callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
               "work_dir": str(self.root / "work"), "quiet_seconds": self.quiet, "max_wait_seconds": 120,
               "destinations": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.orthanc.dicom_port}],
               "retries": 3, "backoff_seconds": 0.5, **overrides}
        path = self.root / f"node{len(self.logs)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(self, web: bool = True, **overrides):
        """Start dicom_node.py with the config's overrides (web: with the web app, when this node has one)."""
        self.overrides = overrides
        log = self.root / f"node{len(self.logs)}.log"
        config = self.config(**overrides)
        self.logs.append(log)
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "dicom_node.py"), "--settings", str(self.settings),
                                          "--config", str(self.predict_cfg), "--node-config", str(config),
                                          *(["--web-port", str(self.web_port)] if self.web_port and web else [])],
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while "listening on" not in log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the node did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return "".join(p.read_text() for p in self.logs)

    def rss_mb(self) -> float:
        """The node process's resident memory now."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
