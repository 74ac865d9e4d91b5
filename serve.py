#!/usr/bin/env python
"""The local web application: one head-CT study in, subtype probabilities per slice out (web/app.py).

Research use only - not for clinical use. Binds to 127.0.0.1 unless --host
says otherwise: the page has no login, so put it behind one before opening it
to a network.
"""
from ich.cli import friendly_errors, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest upload accepted")
    p.add_argument("--max-studies", type=int, default=8, help="results kept in memory (the oldest go first)")
    args = p.parse_args(argv)

    import logging

    import uvicorn

    from ich.study import StudyError
    from models.predict_split import InferenceError
    from stacking.run import StackingError
    from web.app import create_app
    from web.engine import load_engine

    with friendly_errors(InferenceError, StackingError, StudyError, FileNotFoundError):
        engine = load_engine(args.settings, args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(engine, max_upload_mb=args.max_upload_mb, max_studies=args.max_studies)
    print(f"serving on http://{args.host}:{args.port}/  ({engine.model['stage_two']}: "
          f"{', '.join(engine.model['experiments'])})  - research use only, not for clinical use", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
