#!/usr/bin/env bash
# Install headless Chromium (Debian package) for the browser tests (report, web page).
# Used by .ci/run and tests/test_report.py when /usr/bin/chromium is missing. Exit 0 when chromium is there.
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" chromium chromium fonts-dejavu-core
