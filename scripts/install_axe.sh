#!/usr/bin/env bash
# Install axe-core (npm) for the web page's accessibility checks (tests/test_web_page.py injects its single
# axe.min.js into the page). Used by .ci/run and by that test when node_modules/axe-core is missing; after
# it the checks run offline. Exit 0 when node_modules/axe-core/axe.min.js is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=4.14.1
if [ -f node_modules/axe-core/axe.min.js ] && grep -q "\"version\": \"$VERSION\"" node_modules/axe-core/package.json; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    bash scripts/apt_install.sh npm npm || { echo "install_axe.sh: npm missing and could not be installed" >&2; exit 1; }
fi
npm install --no-save --no-audit --no-fund --no-package-lock --prefix . "axe-core@$VERSION" >/dev/null
test -f node_modules/axe-core/axe.min.js
