"""The layout rules: ich/ stands alone; stacking/ never imports torch, except its sequence member
(stacking.sequence), which may use torch but nothing of stage one (models/) or above."""
import subprocess
import sys

import pytest

from conftest import REPO

CHECK = """
import importlib, pkgutil, sys
pkg = importlib.import_module("{pkg}")
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "{pkg}.")] if hasattr(pkg, "__path__") else []
for name in names:
    if name.endswith("__main__") or name in {skip}:
        continue
    importlib.import_module(name)
bad = sorted({{n.split(".")[0] for n in sys.modules if n.split(".")[0] in {forbidden}}})
print(" ".join(bad))
"""


@pytest.mark.parametrize("pkg, forbidden, skip", [
    ("ich", {"models", "stacking", "torch", "timm"}, set()),
    ("stacking", {"models", "torch", "timm", "web"}, {"stacking.sequence"}),  # LightGBM side: no torch
    ("stacking.sequence", {"models", "timm", "web"}, set()),  # the sequence member: torch, not stage one
])
def test_import_boundaries(pkg, forbidden, skip):
    out = subprocess.run([sys.executable, "-c", CHECK.format(pkg=pkg, forbidden=sorted(forbidden), skip=sorted(skip))],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{pkg} pulls in {out.stdout.strip()}"


def test_entry_scripts_stay_thin():
    for script in ("prepare_data.py", "train.py", "predict.py"):
        lines = [ln for ln in (REPO / script).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) < 90, f"{script} has {len(lines)} lines: move logic into a package"
