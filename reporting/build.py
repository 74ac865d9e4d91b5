"""Assemble the report: run every section, write the PNGs and one self-contained HTML page.

A section whose inputs do not exist yet becomes a "Not available: run X"
note. A section that fails for another reason (a bug, a damaged file) also
becomes a note, with the error, and its traceback goes to stderr; the page is
still written, and build_report says how many sections failed so the entry
script can exit non-zero.
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ich.cache import write_atomic
from ich.metric import log_loss_table, weighted_log_loss
from ich.settings import load_settings

from . import html
from .inputs import Commands, Inputs, Unavailable
from .sections import SECTIONS, Context


@dataclass
class ReportResult:
    path: Path
    png_dir: Path
    sections: list[html.Section]
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [s.id for s in self.sections if s.status == "error"]

    @property
    def missing(self) -> list[str]:
        return [s.id for s in self.sections if s.status == "missing"]


def prior_baseline_loss(inp: Inputs) -> float:
    """Each label predicted at its training-fold frequency, scored on the held-out fold (as metrics.csv does)."""
    table = log_loss_table(inp.labels(), inp.slices("train")["fold"].to_numpy(), {})
    return float(table.loc["prior baseline", "weighted"])


def _kpis(inp: Inputs) -> list[tuple[str, str]]:
    def safe(fn):
        try:
            return fn()
        except (Unavailable, KeyError, ValueError, OSError):
            return "–"

    def wll(p):
        return f"{weighted_log_loss(inp.labels(), p):.4f}"

    return [
        ("train slices", safe(lambda: f"{len(inp.slices('train')):,}")),
        ("test slices", safe(lambda: f"{len(inp.slices('test')):,}")),
        ("files rejected (train + test)",
         safe(lambda: f"{sum(len(inp.rejected(s)) for s in ('train', 'test')):,}")),
        ("prior baseline, OOF weighted log loss", safe(lambda: f"{prior_baseline_loss(inp):.4f}")),
        ("stage one, OOF weighted log loss", safe(lambda: wll(inp.stage_one()[1]))),
        ("stage two, OOF weighted log loss", safe(lambda: wll(inp.stage_two()))),
    ]


def build_report(settings_path: str | Path, config_path: str | Path, out: str | Path | None = None,
                 *, gradcam_tp: int = 2, gradcam_fp: int = 2, log=print) -> ReportResult:
    """Write the report; returns where it is and what each section did."""
    from stacking.config import load_predict_config

    t0 = time.time()
    settings = load_settings(settings_path)
    cfg = load_predict_config(config_path)
    inputs = Inputs(settings, cfg, Commands(str(settings_path), str(config_path)))
    png_dir = settings.logs_dir / "report"
    png_dir.mkdir(parents=True, exist_ok=True)
    for old in [*png_dir.glob("*.png"), *png_dir.glob("gradcam/*.png")]:  # the folder is the report's own
        old.unlink()
    ctx = Context(inputs, png_dir, gradcam_tp=gradcam_tp, gradcam_fp=gradcam_fp)
    fmt = {"exp": cfg.experiments[0], "tp": gradcam_tp, "fp": gradcam_fp}

    sections = []
    for spec in SECTIONS:
        sec = html.Section(spec.id, spec.title, spec.lead.format(**fmt))
        t = time.time()
        try:
            spec.build(ctx, sec)
        except Unavailable as exc:
            sec.blocks, sec.status = [html.note(str(exc))], "missing"
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the whole page
            print(f"report: section {spec.id!r} failed:\n{traceback.format_exc()}", file=sys.stderr)
            sec.blocks, sec.status = [html.note(f"{type(exc).__name__}: {exc}", error=True)], "error"
        log(f"  {spec.title:45s} {sec.status:8s} {time.time() - t:5.1f} s")
        sections.append(sec)

    path = Path(out) if out else png_dir / "report.html"
    seconds = time.time() - t0
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = html.page(
        "Intracranial hemorrhage detection: pipeline report",
        [(f"Stage one: `{', '.join(cfg.experiments)}` · stage two: `{cfg.name}` (`{config_path}`) · "
          f"settings: `{settings_path}`"),
         (f"Generated {now} by report.py in {seconds:.0f} s. Every number is out of fold (train images scored by "
          "the fold model that did not train on them) unless it says otherwise.")],
        _kpis(inputs), sections,
        footer=f"Figures also saved as PNG under `{png_dir}`. Regenerate with "
               f"`python report.py --settings {settings_path} --config {config_path}`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: p.write_text(page, encoding="utf-8"))
    return ReportResult(path=path, png_dir=png_dir, sections=sections, seconds=seconds)


__all__ = ["ReportResult", "build_report"]
