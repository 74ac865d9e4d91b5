"""The DICOM node: a scanner or PACS sends a study over DICOM, the model's SR goes back (dicom_node.py).

`node.config` (the YAML config), `node.spool` (received files on disk, per series, until answered),
`node.scp` (the pynetdicom C-ECHO/C-STORE service), `node.deliver` (the SR back: C-STORE, STOW-RS,
the webhook, with retries), `node.service` (series completion, the bounded queue, the engine).
Research use only.
"""
