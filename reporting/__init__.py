"""The pipeline report: one self-contained HTML page a person would rather look at than logs.

`python report.py` reads what prepare_data.py, train.py and predict.py wrote
and draws seven sections (data overview, example slices and the network's
input, training curves, per-label scores, calibration, the weighted log loss,
Grad-CAM). Modules: inputs (find and load the pipeline's files, or say what to
run), scores (per-label metrics), figures (matplotlib), sections (the seven
builders), html (the page) and build (all of it together). Grad-CAM itself
(pytorch_grad_cam on the fold models) is stage one's models.gradcam, which
the web viewer uses too.

A top-level package, not part of stage one: it reads every stage's outputs
and imports models and stacking (lazily, once there is something to draw);
nothing in models/ imports it. Named `reporting`, not `report`, so that it
does not clash with the entry script report.py.
"""
from .build import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
