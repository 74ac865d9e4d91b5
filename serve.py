#!/usr/bin/env python
"""The local web application: one head-CT study in, subtype probabilities per slice out (web/app.py).

Research use only - not for clinical use. Binds to 127.0.0.1 unless --host
says otherwise: the page has no login, so put it behind one before opening it
to a network. It answers only to the bound host's name (and --allow-host),
and refuses requests that another web page sends (Origin).
"""
from ich.cli import friendly_errors, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest upload accepted")
    p.add_argument("--max-studies", type=int, default=8, help="results kept in memory (the oldest go first)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another Host name to answer to (repeatable; the bound host is always answered; '*': any)")
    p.add_argument("--work-dir", default=None,
                   help="the server's own folder for uploads (mode 0700; default: ich-serve-<uid> in the "
                        "system's temporary folder); left-overs of a crashed server are deleted at start-up")
    p.add_argument("--max-unpacked-mb", type=int, default=2048, help="bytes one uploaded zip may unpack to")
    p.add_argument("--read-seconds", type=float, default=120,
                   help="time to read and sort out one upload's files, before it waits for the model")
    p.add_argument("--header-timeout", type=float, default=10,
                   help="seconds a connection may take to send a request's headers")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds an upload may stall")
    args = p.parse_args(argv)

    import logging

    import uvicorn

    from ich.study import StudyError
    from models.checkpoint import CheckpointError
    from models.predict_split import InferenceError
    from stacking.run import StackingError
    from web.app import create_app, quiet_logs
    from web.engine import load_engine
    from web.guard import allowed_hosts_for
    from web.protocol import timed_h11
    from web.uploads import WorkDir

    with friendly_errors(InferenceError, CheckpointError, StackingError, StudyError, FileNotFoundError, RuntimeError):
        work = WorkDir(args.work_dir)  # sweeps a crashed server's uploads
        engine = load_engine(args.settings, args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_logs()
    if work.swept:
        logging.getLogger("ich.web").info("start-up: %d upload folder(s) of a stopped server deleted", work.swept)
    hosts = allowed_hosts_for(args.host, args.allow_host)
    if hosts is not None and args.host in ("0.0.0.0", "::") and not args.allow_host:
        print(f"note: bound to {args.host}, the server answers only to requests for that address: add "
              "--allow-host NAME for each name or address clients use", flush=True)
    app = create_app(engine, max_upload_mb=args.max_upload_mb, max_studies=args.max_studies, allowed_hosts=hosts,
                     work=work, max_unpacked_mb=args.max_unpacked_mb, read_seconds=args.read_seconds,
                     body_timeout=args.body_timeout)
    print(f"serving on http://{args.host}:{args.port}/  ({engine.model['stage_two']}: "
          f"{', '.join(engine.model['experiments'])})  - research use only, not for clinical use", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=timed_h11(args.header_timeout),
                    timeout_keep_alive=5, h11_max_incomplete_event_size=64 << 10)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
