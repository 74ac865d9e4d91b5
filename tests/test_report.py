"""report.py: one self-contained HTML page from the tiny trained pipeline (conftest's `trained`).

Stage two is run here with this file's own predict config and settings
(`report_predict.yaml`, `report_settings.json`: same clean data, models and
logs as the `trained` fixture, its own submission folder), so nothing another
test writes or checks is touched.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from conftest import REPO, run_script

SECTION_IDS = ["data", "examples", "training", "per-label", "calibration", "log-loss", "grad-cam"]
NEEDS_STAGE_ONE = ["training", "per-label", "calibration", "log-loss", "grad-cam"]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def sections(page: str) -> dict[str, str]:
    """section id -> its HTML (each <section ...> up to the next one)."""
    found = re.findall(r'<section class="card" id="([^"]+)" data-status="([^"]+)">(.*?)</section>', page, re.DOTALL)
    return {sid: (status, body) for sid, status, body in found}


def report_settings(settings: Path, work: Path, name: str, **override) -> Path:
    values = json.loads(Path(settings).read_text())
    values["SUBMISSION_DIR"] = str(work / "report_sub")
    values.update({k: str(v) for k, v in override.items()})
    path = work / name
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def report(trained):
    """predict.py (stage two) with this file's config, then report.py: (completed process, html path, work)."""
    settings, _, work = trained
    settings = report_settings(settings, work, "report_settings.json")
    cfg = work / "report_predict.yaml"
    cfg.write_text(yaml.safe_dump({"experiments": ["tiny"], "k_neighbors": 2, "pca_components": 0,
                                   "lgb": {"num_leaves": 7, "min_data_in_leaf": 10, "learning_rate": 0.1,
                                           "num_threads": 2},
                                   "num_boost_round": 100, "early_stopping_rounds": 10, "num_workers": 0}))
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    html_out = work / "report_out" / "report.html"
    out = subprocess.run([sys.executable, str(REPO / "report.py"), "--settings", str(settings), "--config", str(cfg),
                          "--out", str(html_out)], capture_output=True, text=True, cwd=REPO)
    return out, html_out, work


def test_report_has_every_section_and_decodable_images(report):
    out, path, work = report
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(path)  # the page's path is printed last
    page = path.read_text(encoding="utf-8")
    found = sections(page)
    assert list(found) == SECTION_IDS
    assert all(status == "ok" for status, _ in found.values()), {k: s for k, (s, _) in found.items()}
    assert "Not available" not in page and "Could not draw" not in page
    assert "Not in the table: stage two (rounds picked on the scored fold, optimistic)" in page
    for sid in SECTION_IDS:
        assert f'href="#{sid}"' in page  # table of contents

    # self-contained: no script, no external or relative resource, every image an embedded PNG that decodes
    assert "<script" not in page.lower()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs[:5]
    images = DATA_URI.findall(page)
    assert len(images) == 9  # 2 data, 2 examples, 1 training curve, PR, calibration, log loss, Grad-CAM
    for b64 in images:
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and min(img.shape[:2]) >= 100 and img.std() > 0.01

    # every section has a figure; PNGs also on disk under LOGS_DIR/report/
    for sid, (_, body) in found.items():
        assert DATA_URI.search(body), f"section {sid} has no figure"
    png_dir = work / "logs" / "report"
    pngs = sorted(p.name for p in png_dir.glob("*.png"))
    for name in ("data_labels.png", "data_series.png", "examples_windows.png", "examples_network_input.png",
                 "training_tiny.png", "per_label_pr.png", "calibration.png", "log_loss.png", "gradcam.png"):
        assert name in pngs

    # Grad-CAM: overlays drawn (and saved one by one), with the layer named
    _, cam = found["grad-cam"]
    n = int(re.search(r'data-overlays="(\d+)"', cam).group(1))
    assert n >= 1 and len(list((png_dir / "gradcam").glob("*.png"))) == n
    assert "Target layer: <code>backbone.layer" in cam and "of test_resnet" in cam

    # the numbers: per-label table for both stages, and the metrics.csv log-loss table
    _, per_label = found["per-label"]
    assert "stage one (tiny)" in per_label and "stage two" in per_label and "ROC AUC" in per_label
    _, loss = found["log-loss"]
    assert "prior baseline" in loss and "metrics.csv" in loss


def test_sections_without_inputs_degrade_to_notes(report, tmp_path):
    """No stage one / stage two outputs at all: data sections render, the rest say what to run."""
    _, _, work = report
    settings = report_settings(work / "report_settings.json", tmp_path, "empty_settings.json",
                               MODEL_CHECKPOINT_DIR=tmp_path / "models", LOGS_DIR=tmp_path / "logs")
    cfg = work / "report_predict.yaml"
    out = subprocess.run([sys.executable, str(REPO / "report.py"), "--settings", str(settings), "--config", str(cfg)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    path = tmp_path / "logs" / "report" / "report.html"
    assert out.stdout.strip().splitlines()[-1] == str(path)
    found = sections(path.read_text(encoding="utf-8"))
    assert list(found) == SECTION_IDS
    assert found["data"][0] == "ok"
    assert found["examples"][0] == "partial"  # windows shown; the network's input needs config.json
    for sid in NEEDS_STAGE_ONE:
        status, body = found[sid]
        assert status == "missing", sid
        assert "Not available:" in body and "python train.py" in body, sid
        assert not DATA_URI.search(body), sid
    assert "not available yet" in out.stdout


def test_missing_stage_two_is_a_note_inside_the_section(report, tmp_path):
    """Stage one there, stage two never run for this config name: per-label scores show stage one only."""
    from ich.settings import load_settings
    from reporting.html import Section
    from reporting.inputs import Commands, Inputs
    from reporting.sections import Context, log_loss, per_label
    from stacking.config import PredictCfg

    _, _, work = report
    settings = load_settings(work / "report_settings.json")
    inputs = Inputs(settings, PredictCfg(name="never_run", experiments=["tiny"]),
                    Commands("S.json", "configs/predict/never_run.yaml"))
    ctx = Context(inputs, tmp_path)
    sec = Section("per-label", "Per-label scores", "")
    per_label(ctx, sec)
    body = "".join(sec.blocks)
    assert sec.status == "partial" and "stage one (tiny)" in body and "<td class=\"txt\">stage two" not in body
    assert "python predict.py --settings S.json --config configs/predict/never_run.yaml" in body
    sec = Section("log-loss", "Weighted log loss", "")
    log_loss(ctx, sec)
    assert sec.status == "partial" and "computed by report.py" in "".join(sec.blocks)


def test_gradcam_target_layer_is_generic():
    import timm
    from torch import nn

    from models.gradcam import target_layer

    class Wrapped(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.backbone = timm.create_model(name, num_classes=0)

    m = Wrapped("test_resnet")
    assert target_layer(m, 256) is m.backbone.layer4  # last feature block: 8 x 8 cells at 256 px
    assert target_layer(m, 64) is m.backbone.layer2   # 64 px: the deepest block still 8 cells wide
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1))
    assert target_layer(plain) is plain[2]  # no feature_info: the last Conv2d


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    script = REPO / "scripts" / "install_chromium.sh"
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        pytest.skip("headless Chromium missing and scripts/install_chromium.sh timed out (no apt access?)")
    found = shutil.which("chromium")
    if done.returncode or not found:
        pytest.skip("headless Chromium missing and could not be installed by scripts/install_chromium.sh "
                    f"(needs root and apt): {(done.stderr or done.stdout).strip()[-300:]}")
    return found


def test_page_renders_in_headless_chromium(report, tmp_path):
    _, path, _ = report
    chromium = _chromium()
    shot = tmp_path / "page.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--window-size=1280,2400", f"--screenshot={shot}", path.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.is_file() and shot.stat().st_size > 50_000
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    assert img[..., :3].std() > 0.05 and len(np.unique(img[::7, ::7, 0])) > 50  # a real page, not blank
