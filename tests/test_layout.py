"""The layout rules of DESIGN.md: ich/ stands alone, stacking/ never imports torch."""
import subprocess
import sys

import pytest

from conftest import REPO

CHECK = """
import importlib, pkgutil, sys
pkg = importlib.import_module("{pkg}")
for m in pkgutil.walk_packages(pkg.__path__, "{pkg}."):
    if m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
bad = sorted(n for n in sys.modules if n.split(".")[0] in {forbidden})
print(" ".join(bad))
"""


@pytest.mark.parametrize("pkg, forbidden", [
    ("ich", {"models", "stacking", "torch", "timm"}),
    ("stacking", {"models", "torch", "timm"}),
])
def test_import_boundaries(pkg, forbidden):
    out = subprocess.run([sys.executable, "-c", CHECK.format(pkg=pkg, forbidden=sorted(forbidden))],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{pkg} pulls in {out.stdout.strip()}"


def test_entry_scripts_stay_thin():
    for script in ("prepare_data.py", "train.py", "predict.py"):
        lines = [ln for ln in (REPO / script).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) < 90, f"{script} has {len(lines)} lines: move logic into a package"
