#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb), the PACS the
# DICOM node's tests send studies from and SRs back to (tests/test_node.py; it skips with a message
# when Orthanc is missing). Exit 0 when Orthanc and the plugin are there afterwards.
set -euo pipefail
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if command -v Orthanc >/dev/null 2>&1 && [ -f "$plugin" ]; then
    exit 0
fi
bash "$(dirname "$0")/apt_install.sh" "Orthanc" orthanc orthanc-dicomweb || true
command -v Orthanc >/dev/null 2>&1 && [ -f "$plugin" ] || {
    [ -f "$plugin" ] || echo "install_orthanc.sh: the DICOMweb plugin is missing (apt-get install -y orthanc-dicomweb)" >&2
    exit 1
}
