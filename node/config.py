"""configs/node/*.yaml: the DICOM node's settings, checked like every config (ich.config.check_fields).

One file says who may send (calling AE titles, optionally their hosts), when a series counts as
complete (a quiet window after its last instance, and a longest wait), where the node keeps what it
received, the caps (the web upload's: bytes and files a series, plus a spool total), where the SR
goes (C-STORE destinations and/or a STOW-RS URL, with retries and backoff), and the optional
webhook and viewer link.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ich.config import ConfigError, check_fields, load_yaml, need
from ich.study import MAX_FILES


@dataclass
class Caller:
    ae_title: str
    host: str | None = None  # None: any host


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int


@dataclass
class NodeCfg:
    ae_title: str = "ICH_NODE"
    host: str = "127.0.0.1"  # address to listen on
    port: int = 11112
    callers: list = field(default_factory=list)       # [{ae_title, host}]: who may send (empty: nobody)
    work_dir: str = "ich-node"                        # spool and outbox; relative: to LOGS_DIR
    quiet_seconds: float = 5.0                        # a series is complete this long after its last instance
    max_wait_seconds: float = 600.0                   # ... or this long after its first, whatever keeps coming
    keep_answered_seconds: float = 3600.0             # an answered series waits this long for late instances
    max_series_mb: int = 1024                         # the web upload's cap, per series
    max_series_files: int = MAX_FILES
    max_spool_mb: int = 8192                          # everything received and not yet cleaned up
    max_queued: int = 16                              # complete series waiting for the model
    threshold: float = 0.5                            # "above threshold" in the SR's counts and the webhook
    destinations: list = field(default_factory=list)  # [{ae_title, host, port}]: C-STORE the SR there
    stow_url: str | None = None                       # DICOMweb base URL (.../dicom-web): STOW-RS the SR there
    send_source_ae: str | None = None                 # the node's AE title when sending (default: ae_title)
    retries: int = 5
    backoff_seconds: float = 2.0                      # first wait after a failed send, doubled each time
    webhook_url: str | None = None                    # POST a JSON notice of each result here
    viewer_url: str | None = None                     # the web app's base URL, for links to the result

    def allows(self, ae_title: str, host: str) -> bool:
        return any(c.ae_title == ae_title and c.host in (None, host) for c in self.callers)


def load_node_config(path: str | Path, logs_dir: Path | None = None) -> NodeCfg:
    """The YAML file -> a checked NodeCfg (unknown keys, wrong types and ranges are one-line errors)."""
    where = str(path)
    data = load_yaml(path)
    kwargs = check_fields(NodeCfg, data, where)
    for key, cls in (("callers", Caller), ("destinations", Destination)):
        items = kwargs.get(key, [])
        if not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{where}: {key} must be a list of mappings, got {items!r}")
        kwargs[key] = [cls(**check_fields(cls, i, where, section=f"{key}[{n}]")) for n, i in enumerate(items)]
    cfg = NodeCfg(**kwargs)
    need(cfg.callers, where, "callers is empty: list the AE titles (and hosts) that may send studies")
    need(cfg.destinations or cfg.stow_url, where, "say where the SR goes: destinations (C-STORE) and/or stow_url")
    for key in ("quiet_seconds", "max_wait_seconds", "backoff_seconds"):
        need(getattr(cfg, key) > 0, where, f"{key} must be > 0, got {getattr(cfg, key)}")
    need(cfg.max_wait_seconds >= cfg.quiet_seconds, where, "max_wait_seconds must be >= quiet_seconds")
    for key in ("max_series_mb", "max_series_files", "max_spool_mb", "max_queued", "port"):
        need(getattr(cfg, key) >= 1, where, f"{key} must be >= 1, got {getattr(cfg, key)}")
    need(cfg.retries >= 0 and cfg.keep_answered_seconds >= 0, where, "retries and keep_answered_seconds must be >= 0")
    need(0 < cfg.threshold < 1, where, f"threshold must be in (0, 1), got {cfg.threshold}")
    for i, name in enumerate([cfg.ae_title, cfg.send_source_ae or cfg.ae_title, *(c.ae_title for c in cfg.callers),
                              *(d.ae_title for d in cfg.destinations)]):
        need(0 < len(name.strip()) <= 16 and "\\" not in name, where, f"AE title {name!r}: 1 to 16 characters, no \\")
    if logs_dir is not None and not Path(cfg.work_dir).is_absolute():
        cfg.work_dir = str(Path(logs_dir) / cfg.work_dir)
    return cfg
