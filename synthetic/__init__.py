"""Synthetic RSNA-ICH data: head-CT phantoms written as DICOMs in Kaggle's layout.

The real data (about 450 GB) cannot be fetched onto the development and CI
machines, so the demo and the tests run on data from this package:
``generate_dataset`` writes ``stage_2_train/``, ``stage_2_test/`` and the
csv files exactly where Kaggle's would be, and ``write_ct_slice`` writes one
slice with the real files' header quirks (see ``dicom_writer``).

Command line: ``python -m synthetic --out DIR`` (``--help`` for options).

A top-level package beside the domain core: it imports ``ich`` (labels)
and nothing of the pipeline (models, stacking, pipeline, web), so the
core never ships test-data code (tests/test_layout.py checks both).
"""
from .dicom_writer import write_ct_slice
from .generate import generate_dataset

__all__ = ["generate_dataset", "write_ct_slice"]
