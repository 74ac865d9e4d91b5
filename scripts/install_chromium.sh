#!/usr/bin/env bash
# Install headless Chromium (Debian package) for the report's browser test.
# Used by tests/test_report.py when /usr/bin/chromium is missing; needs root and
# access to the apt registry. Exit 0 when chromium is there afterwards.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium.sh: not root; install chromium yourself (apt-get install -y chromium)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: no apt-get on this machine; install chromium yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null 2>&1
