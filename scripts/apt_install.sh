#!/usr/bin/env bash
# Install Debian packages when the commands they provide are missing (the tests' system tools:
# Chromium, dcmtk, dicom3tools). Needs root and access to the apt registry.
# Usage: bash scripts/apt_install.sh "cmd1 cmd2" pkg1 pkg2 ...   Exit 0 when every command is there afterwards.
set -euo pipefail
commands=$1; shift
have_all() { for c in $commands; do command -v "$c" >/dev/null 2>&1 || return 1; done; }
if have_all; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "apt_install.sh: not root; install them yourself (apt-get install -y $*)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt_install.sh: no apt-get on this machine; install $* yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
have_all
