"""The node's DICOM service (pynetdicom): C-ECHO, and C-STORE for every storage SOP class.

Why every storage class, when only CT images are read: a PACS forwards whole studies (scouts, dose
reports, secondary captures); a refused presentation context fails its job and alarms someone. So
everything is accepted and stored, and `ich.study.choose_series` later gives each file that is no
axial CT slice its reason (logged, and in the SR where a CT series is reported). Every transfer
syntax pynetdicom knows is accepted; a pixel encoding the decoder cannot read gets prepare_data's
reason the same way.

Who may send: the configured calling AE titles, each optionally from one host (A-ASSOCIATE-RJ
"calling AE title not recognised" otherwise). What a C-STORE answers: 0x0000 once the instance is
on disk; 0xC210 ("cannot understand") for a dataset that does not parse, 0xA900 ("does not match
SOP class") for one without its UIDs; 0xA700 ("out of resources") when the series or the spool is
at its cap. Odd content (a corrupt pixel stream, a wrong modality) is stored and answered 0x0000.
"""
from __future__ import annotations

import logging

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

log = logging.getLogger("ich.node")

CANNOT_UNDERSTAND, NOT_MATCHING, OUT_OF_RESOURCES = 0xC210, 0xA900, 0xA700


def make_ae(cfg, receive) -> tuple[AE, list]:
    """The AE and its event handlers. receive(study, series, sop, bytes) -> DIMSE status."""
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = 16

    def requested(event):
        caller, host = event.assoc.requestor.primitive.calling_ae_title, event.assoc.requestor.address
        if not cfg.allows(caller.strip(), host):
            log.warning("association refused: calling AE title %r from %s is not in callers", caller.strip(), host)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            event.assoc.kill()  # as pynetdicom's own rejections: waits until the A-ASSOCIATE-RJ has gone

    def store(event):
        try:
            ds = event.dataset
            uids = [str(ds.get(k) or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on a malformed stream
            log.warning("C-STORE refused: the dataset does not parse (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND
        if not all(uids):
            log.warning("C-STORE refused: the dataset lacks its study, series or SOP instance UID")
            return NOT_MATCHING
        return receive(*uids, event.encoded_dataset())

    handlers = [(evt.EVT_REQUESTED, requested), (evt.EVT_C_STORE, store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
    return ae, handlers
