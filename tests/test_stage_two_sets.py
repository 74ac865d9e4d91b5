"""benchmarks/stage_two_sets.py on a tiny generated table: its printed table holds every member's scores.

The script is how stage two's defaults are chosen (tuning sets) and reported (held-out sets,
BENCHMARKS.md), so its table must carry the members' honest OOF and test scores and the per-fold gains
the rule for added complexity reads; LightGBM is trained once per table and config and reused.
"""
import json
import re
import subprocess
import sys

from conftest import REPO

CELL = r"(\d\.\d{4}) / (\d\.\d{4})"


def run(tmp_path, *variants):
    cmd = [sys.executable, str(REPO / "benchmarks" / "stage_two_sets.py"), "--config",
           str(REPO / "configs" / "predict" / "default.yaml"), "--tables", str(tmp_path),
           "--table", "tiny:seed=1,rows=2500,test=800,phi=0.9", "--set", "num_boost_round=30",
           "--set", "learning_rate=0.1", "--set", "early_stopping_rounds=10", "--set", "k_neighbors=3",
           "--set", "sequence.epochs=3", "--set", "sequence.hidden=8", "--set", "sequence.device=cpu",
           "--json", str(tmp_path / "out.json")] + [a for v in variants for a in ("--variant", v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_stage_two_sets_prints_every_members_scores_on_a_generated_table(tmp_path):
    out = run(tmp_path, "today:", "fixed:sequence.schedule=cosine,sequence.diffs=true")
    header = next(line for line in out.splitlines() if line.startswith("| set |"))
    assert all(f"{r} OOF / test" in header for r in ("prior", "stage one", "lightgbm", "sequence", "blend"))
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == ["today", "fixed"]
    for row in rows:
        cells = re.findall(CELL, row)
        assert len(cells) == 6, row  # prior, stage one, lightgbm, sequence, blend, grid blend
        prior, one, lgb, seq, blend, _ = [tuple(map(float, c)) for c in cells]
        assert max(one[0], lgb[0], seq[0], blend[0]) < prior[0] and blend[0] <= lgb[0] + 0.002  # honest OOF
    assert re.search(r"fixed vs today: sequence OOF gain per fold \[.*\], mean [+-]\d\.\d{4}, spread", out)
    assert "fixed: sequence epochs [3, 3, 3, 3, 3]" in out  # the fixed schedule keeps its last epoch
    results = json.loads((tmp_path / "out.json").read_text())
    assert results[0]["scores"]["lightgbm"] == results[1]["scores"]["lightgbm"]  # one LightGBM per table
    cached = list((tmp_path / "tiny" / "lightgbm_cache").glob("*.npz"))
    assert len(cached) == 1
    again = run(tmp_path, "today:")  # the table and LightGBM's predictions are reused, scores identical
    row = next(line for line in again.splitlines() if line.startswith("| tiny | today"))
    assert re.findall(CELL, row)[:3] == re.findall(CELL, rows[0])[:3]


def test_lightgbm_variants_prints_cost_and_scores_per_variant(tmp_path):
    """benchmarks/lightgbm_variants.py (how LightGBM's settings were chosen for speed): per variant its
    CPU seconds, rounds trained and honest OOF / test, and the per-fold gain against the first variant;
    a variant that boosts fewer rounds must say so."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "lightgbm_variants.py"), "--tables", str(tmp_path),
           "--table", "tiny:seed=1,rows=2500,test=800,phi=0.9", "--set", "num_boost_round=40",
           "--set", "k_neighbors=3", "--set", "num_threads=1",
           "--variant", "slow:learning_rate=0.05", "--variant", "fast:learning_rate=0.3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("tiny ")]
    assert [line.split(":")[0] for line in lines] == ["tiny slow", "tiny fast"]
    rounds = [int(re.search(r"rounds trained (\d+)", line).group(1)) for line in lines]
    scores = [tuple(map(float, re.search(r"honest OOF (\d\.\d+), test (\d\.\d+)", line).groups())) for line in lines]
    assert rounds[1] < rounds[0] and all(0 < s < 0.3 for pair in scores for s in pair)
    assert re.search(r"OOF gain per fold vs slow \[.*\], mean [+-]\d\.\d{5}, sd", lines[1])
