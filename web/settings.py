"""serve.py's settings: every default stated once, here; serve.py makes one command-line option of each field.

Why these bounds (README "What happens to bad input", BENCHMARKS.md's hostile
table): every surface of the server runs under one budget. An upload is
received within `upload_seconds` (and `body_timeout` per stall), at most
`max_uploads + max_queued` in the server at once (more: 503 with
Retry-After), their bodies within `max_uploads x max_upload_mb` of disk,
`max_uploads` read and predicted at once (web.deps.Slots), and a read that
is slow while others want a turn gives its turn back to go on in one of
`max_slow_reads` places (more: stopped, 503 with Retry-After), so at most
`max_uploads + max_slow_reads` reading processes run at once, holding at
most `readers_mb` of memory together (over it, the largest is stopped);
it is read and decoded in its own process with `upload_memory_mb` of address
space and `read_seconds` of time, up to `max_series` series and
`max_source_mpx` source pixels; results keep at most `store_mb` of images
and files in all; `max_renders` images are drawn at once (more wait
`render_wait` seconds, then 503).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ServerSettings:
    max_upload_mb: int = _opt(1024, "largest upload accepted")
    max_studies: int = _opt(8, "results kept in memory (the oldest go first)")
    max_unpacked_mb: int = _opt(2048, "bytes one uploaded zip may unpack to")
    read_seconds: float = _opt(120, "time to read, sort out and decode one upload's files, before it waits "
                                    "for the model")
    upload_seconds: float = _opt(300, "time one upload's body may take to arrive, in all")
    body_timeout: float = _opt(30, "seconds an upload may stall")
    header_timeout: float = _opt(10, "seconds a connection may take to send a request's headers")
    max_uploads: int = _opt(4, "uploads read and predicted at once (a turn each, taken once its body is in; "
                               "smallest first); the bodies being received hold at most this many times "
                               "max_upload_mb of disk")
    max_queued: int = _opt(16, "uploads in the server beside those turns (receiving their body, or waiting for "
                               "room or a turn); one more is told to come back (503 with Retry-After)")
    max_slow_reads: int = _opt(2, "reads still running after a second while other uploads want a turn, which "
                                  "give their turn back and go on at a lower priority; one more is stopped "
                                  "(503 with Retry-After)")
    max_series: int = _opt(4, "series of one upload decoded and predicted (the page switches between them)")
    max_source_mpx: int = _opt(512, "megapixels of source slices decoded per upload (512: 2,000 slices of 512 x 512)")
    upload_memory_mb: int = _opt(2048, "memory (address space) one upload's reading process may take")
    readers_mb: int = _opt(4096, "memory all uploads' reading processes may hold together (resident, not "
                                 "file-backed); over it, the one that holds the most is stopped (503 with "
                                 "Retry-After). Twice upload_memory_mb: one upload that needs its whole "
                                 "limit is read beside the others")
    store_mb: int = _opt(256, "memory all kept results may take (images, files for the viewer, Grad-CAM "
                              "maps); over it, the viewer's files of the oldest results go first")
    max_renders: int = _opt(2, "images (PNG, Grad-CAM) drawn at once")
    render_wait: float = _opt(10, "seconds an image request waits for its turn before a 503")
    work_dir: str | None = _opt(None, "the server's own folder for uploads (mode 0700; default: ich-serve-<uid> "
                                      "in the system's temporary folder); left-overs of a crashed server are "
                                      "deleted at start-up")
    allowed_hosts: frozenset | None = field(default=frozenset({"127.0.0.1", "localhost", "::1"}),
                                            metadata={"cli": False})

    @classmethod
    def options(cls):
        """(name, type, default, help) of each field serve.py offers as --name."""
        for f in fields(cls):
            if f.metadata.get("cli", True):
                kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
                yield f.name, kind, f.default, f.metadata["help"]
