#!/usr/bin/env bash
# Install dcmtk (dsrdump) and dicom3tools (dciodvfy), the DICOM validators the SR tests run
# (tests/test_sr.py, tests/test_web.py; they skip those checks with a message when the tools are missing).
# Exit 0 when both tools are there afterwards.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" "dsrdump dciodvfy" dcmtk dicom3tools
