#!/usr/bin/env python
"""The local web application: one head-CT study in, subtype probabilities per slice out (web/app.py).

Research use only - not for clinical use. Binds to 127.0.0.1 unless --host
says otherwise: the page has no login, so put it behind one before opening it
to a network. It answers only to the bound host's name (and --allow-host),
and refuses requests that another web page sends (Origin). Every bound
(upload size, time, memory, uploads at once) is an option below; the
defaults are web/settings.py's.
"""
from ich.cli import friendly_errors, parser


def main(argv=None):
    from web.heap import one_arena
    from web.settings import ServerSettings

    one_arena()  # before any thread allocates: a flood's freed memory then goes back (web/heap.py)

    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer to (repeatable; the bound host is always answered; '*': any)")
    for name, kind, default, text in ServerSettings.options():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"{text} (default {default})")
    args = p.parse_args(argv)

    import logging

    from ich.study import StudyError
    from models.checkpoint import CheckpointError
    from models.predict_split import InferenceError
    from stacking.run import StackingError
    from web.app import create_app, quiet_logs
    from web.engine import load_engine
    from web.guard import allowed_hosts_for
    from web.protocol import serve
    from web.uploads import WorkDir

    quiet_logs()  # before anything is loaded: libraries' loggers and warnings never carry a header's value
    hosts = allowed_hosts_for(args.host, args.allow_host)
    settings = ServerSettings(**{name: getattr(args, name) for name, *_ in ServerSettings.options()},
                              allowed_hosts=None if hosts is None else frozenset(hosts))
    with friendly_errors(RuntimeError):
        work = WorkDir(settings.work_dir)  # sweeps a crashed server's uploads
    if work.swept:
        logging.getLogger("ich.web").info("start-up: %d upload folder(s) of a stopped server deleted", work.swept)
    if hosts is not None and args.host in ("0.0.0.0", "::") and not args.allow_host:
        print(f"note: bound to {args.host}, the server answers only to requests for that address: add "
              "--allow-host NAME for each name or address clients use", flush=True)
    # the models are loaded before the server starts: a missing or damaged checkpoint is one line on stderr
    # and exit code 2 (raised inside the app's lifespan, uvicorn would log its own lines and exit with 3)
    with friendly_errors(InferenceError, CheckpointError, StackingError, StudyError, FileNotFoundError, RuntimeError):
        engine = load_engine(args.settings, args.config)
    app = create_app(engine, settings=settings, work=work, on_ready=lambda model: print(
        f"serving on http://{args.host}:{args.port}/  ({model['stage_two']}: "
        f"{', '.join(model['experiments'])})  - research use only, not for clinical use", flush=True))
    try:
        serve(app, header_timeout=settings.header_timeout, host=args.host, port=args.port, log_level="warning",
              log_config=None, lifespan="on", timeout_keep_alive=5, h11_max_incomplete_event_size=64 << 10)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
