"""The layout rules.

- ich/ stands alone; stacking/ never imports torch, except its sequence member
  (stacking.sequence), which may use torch but nothing of stage one (models/) or above;
  models/ (stage one) imports nothing of stage two, the engine, the web app or the report;
  synthetic/ (test data) imports ich only (test_import_boundaries: what importing each
  module really loads).
- The import graph of the packages' source (test_import_graph_*: every import
  statement, at module level or inside a function, read with ast): no cycles, no
  import from a lower layer to a higher one, and no package grown past a share
  of the code. ARCHITECTURE.md draws the layers.
"""
import ast
import subprocess
import sys
from pathlib import Path

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
    ("ich", {"models", "stacking", "synthetic", "reporting", "pipeline", "web", "torch", "timm"}, set()),
    ("stacking", {"models", "torch", "timm", "web"}, {"stacking.sequence"}),  # LightGBM side: no torch
    ("stacking.sequence", {"models", "timm", "web"}, set()),  # the sequence member: torch, not stage one
    ("models", {"stacking", "pipeline", "web", "reporting"}, set()),  # stage one knows nothing of stage two
    ("pipeline", {"web", "reporting", "node"}, set()),
    ("node", {"web", "reporting"}, set()),  # the DICOM node: beside the web app, on the engine
    ("synthetic", {"models", "stacking", "web", "pipeline"}, set()),
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


# --- the import graph ------------------------------------------------------------------------------

PACKAGES = ["ich", "synthetic", "models", "stacking", "reporting", "pipeline", "web", "node", "kaggle"]
# A package may import only packages of a lower layer (and itself). The entry scripts sit above all.
LAYER = {"ich": 0,
         "synthetic": 1, "models": 1, "stacking": 1,
         "reporting": 2, "pipeline": 2,
         "web": 3, "node": 3, "kaggle": 3}
MAX_SHARE = 0.25  # of the packages' code lines


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every .py file of the packages that exist."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The repository modules `name` imports, by every import statement in the file (functions included).

    `from a import b` counts as importing a.b when that is a module, else a; `import a.b.c` as the
    longest of a.b.c, a.b, a that is a module. Other libraries are left out.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . (level 1, this package), from .. (its parent), ...
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            hit = next((m for m in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if m in known), None)
            if hit and hit != name:
                found.add(hit)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def package(module: str) -> str:
    return module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_import_graph_reads_every_kind_of_import():
    edges = graph()
    assert "ich.labels" in edges["synthetic.generate"]               # from ich.labels import ...
    assert "models.config" in edges["models.optim"]                   # from .config import ...
    assert "models.gradcam" in edges["reporting.sections"]           # from models import gradcam, in a function
    assert "stacking.config" in edges["reporting.build"]             # inside a function
    assert "reporting" not in edges["reporting.build"]               # from . import html: the module, not the package
    assert not any(package(m) not in LAYER for targets in edges.values() for m in targets)


def test_import_graph_has_no_cycles():
    edges = graph()
    packages = {}
    for source, targets in edges.items():
        packages.setdefault(package(source), set()).update(package(t) for t in targets if package(t) != package(source))
    found = cycles(packages) + cycles(edges)
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_import_graph_goes_down_the_layers_only():
    breaks = sorted((source, target) for source, targets in graph().items() for target in targets
                    if package(target) != package(source) and LAYER[package(target)] >= LAYER[package(source)])
    assert not breaks, f"imports up the layers or across one (module, imported module): {breaks}"


def code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_no_package_holds_too_much_of_the_code():
    lines = {}
    for name, path in modules().items():
        lines[package(name)] = lines.get(package(name), 0) + code_lines(path)
    total = sum(lines.values())
    shares = {pkg: n / total for pkg, n in sorted(lines.items(), key=lambda kv: -kv[1])}
    table = ", ".join(f"{pkg} {share:.1%}" for pkg, share in shares.items())
    assert max(shares.values()) <= MAX_SHARE, f"a package over {MAX_SHARE:.0%} of {total} code lines: {table}"
