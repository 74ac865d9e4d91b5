#!/usr/bin/env bash
# Install dcmtk (dsrdump) and dicom3tools (dciodvfy), the DICOM validators the SR tests run
# (tests/test_sr.py, tests/test_web.py; they skip those checks with a message when the tools are missing).
# Needs root and access to the apt registry. Exit 0 when both tools are there afterwards.
set -euo pipefail
if command -v dsrdump >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_dicom_tools.sh: not root; install them yourself (apt-get install -y dcmtk dicom3tools)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_dicom_tools.sh: no apt-get on this machine; install dcmtk and dicom3tools yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dcmtk dicom3tools >/dev/null
command -v dsrdump >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1
