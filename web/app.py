"""serve.py's web application (FastAPI): routers per resource over one typed result per series.

API (the page uses nothing else; /api/openapi.json lists it with its models):
- `POST /api/studies[?series=N]` (web.routes.studies): multipart form, field
  `files`: one .zip or several DICOM files of one study -> 201 and the
  result. Every usable CT series (up to `max_series`) is read and predicted
  once; `series` picks which is chosen (its index in `series`).
- `GET /api/studies/{id}[?series=K]`: the result again; K: another series'
  results at the top level (404 when K has none). `DELETE` forgets it;
  `.../patient`: patient name and ID, for the page to show only on request.
- `GET /api/studies/{id}/download/{csv|kaggle_csv|json|sr}[?threshold=T&series=K]`
  (web.routes.downloads): the outputs of `predict.py --study`, named by the
  result's tag and the threshold (`ich_<id>_<date>_t0.50.csv`).
- `GET /api/studies/{id}/slices/{row}/{image,hu,cam}.png[?series=K]` and
  `.../series/{index}/thumbnail.png` (web.routes.views): the viewer's images.
- `GET /` and `/api/health` (web.routes.pages).
Errors (web.errors): JSON `{"error": "..."}` in one line, 422 included; 503
with Retry-After when the server is full.

Safety (README "What happens to bad input"; BENCHMARKS.md's hostile
table): web.guard checks Host and Origin and sets the security headers;
each upload is streamed into its own folder under one server-owned folder
(web.uploads) within a total time, at most `max_uploads + max_queued` in
the server and `max_uploads` read and predicted at once (web.deps.Slots;
a slow read gives its turn back for one of `max_slow_reads` places),
deleted when the request ends, on error too, or at the next start after a
crash.
The files are read, sorted out and decoded in a process of the upload's own
with a memory and a time limit (web.reader), outside the model's lock; the
models run under one lock (web.engine). Results live in memory only, within
one byte budget (web.store); images are drawn a few at a time (web.render).
Nothing with patient data (names, IDs, UIDs, file names, dates) is logged:
log lines say counts and timings, and every other logger, warnings
included, says only where it came from (`quiet_logs`).
"""
from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .deps import Server, Slots
from .engine import WebEngine, load_engine
from .errors import install
from .guard import Guard
from .reader import Reader
from .render import Renders
from .routes import downloads, pages, studies, views
from .settings import ServerSettings
from .store import StudyStore
from .uploads import WorkDir

HERE = Path(__file__).resolve().parent
log = logging.getLogger("ich.web")


def create_app(engine: WebEngine | None = None, settings: ServerSettings | None = None, *,
               model_paths: tuple[str, str] | None = None, work: WorkDir | None = None, load_errors=(),
               on_ready=None, **overrides) -> FastAPI:
    """The application. engine: one already loaded (tests share one; it is not closed here); else the
    lifespan loads it from model_paths (settings file, predict config) and closes it at the end; an error
    of load_errors is one line on stderr (ich.cli.friendly_errors) and stops the server. on_ready(model):
    called once the models are loaded. overrides: ServerSettings fields (tests)."""
    import dataclasses

    settings = dataclasses.replace(settings or ServerSettings(), **overrides)
    work = work or WorkDir(settings.work_dir)
    store = StudyStore(settings.max_studies, settings.store_mb << 20)

    def build(engine: WebEngine) -> Server:
        return Server(settings, engine, store, Reader(engine.prepare_cfg, settings.readers_mb << 20), work,
                      Renders(settings.max_renders, settings.render_wait),
                      Slots(settings.max_uploads, settings.max_queued, settings.upload_seconds,
                            settings.max_uploads * settings.max_upload_mb << 20, settings.max_slow_reads))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = app.state.server is None
        if owned:
            from ich.cli import friendly_errors
            with friendly_errors(*load_errors):
                app.state.server = build(load_engine(*model_paths))
        if on_ready is not None:
            on_ready(app.state.server.engine.model)
        try:
            yield
        finally:
            srv = app.state.server
            srv.reader.close()  # a reading process stops now
            if owned:
                srv.engine.close()

    # no /api/docs: FastAPI's docs page loads its script from a public CDN, which an offline machine
    # cannot reach and the page's Content-Security-Policy does not allow; the schema stays
    app = FastAPI(title="ICH study viewer (research use only)", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.server = build(engine) if engine is not None else None
    app.add_middleware(Guard, allowed_hosts=None if settings.allowed_hosts is None else set(settings.allowed_hosts))
    install(app)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for router in (pages.router, studies.router, downloads.router, views.router):
        app.include_router(router)
    return app


class _Withheld(logging.Filter):
    """Every record not from this app's own loggers ("ich.*") keeps its logger's name and level only: a
    library's message or traceback may hold a header's value (highdicom's person-name warning, pydicom's
    'invalid value for VR DA: ...'), and warnings arrive here as records of "py.warnings"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ich"):
            record.msg = f"({record.levelname.lower()} of {record.name}: message withheld, it may hold patient data)"
            record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
        return True


def quiet_logs(level: int = logging.INFO) -> None:
    """One handler on stderr for every logger, warnings included, through `_Withheld`; libraries at
    warnings and up (highdicom says at INFO which dataset it copies the patient module from)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    handler.addFilter(_Withheld())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in ("highdicom", "pydicom", "uvicorn.access", "python_multipart", "multipart", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
