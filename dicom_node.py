#!/usr/bin/env python
"""The DICOM node: a scanner or PACS sends a study (C-STORE), the model's DICOM SR goes back.

Research use only - not for clinical use. Listens where configs/node/*.yaml says (default
127.0.0.1:11112), accepts only the calling AE titles (and hosts) listed there, and sends each
series' SR to the configured C-STORE destinations and/or STOW-RS URL (README, "Connecting to a PACS").
Stop it with Ctrl-C or SIGTERM; what it received and did not answer yet is processed at the next start.
With --web-port it also serves the web app (serve.py's) on 127.0.0.1 in the same process, on the same
engine: each result is in the app's store and the node logs (and posts to the webhook) a viewer link.
"""
from ich.cli import friendly_errors, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--node-config", default="configs/node/orthanc.yaml", help="the node's config")
    p.add_argument("--web-port", type=int, default=None,
                   help="also serve the web app on this port of 127.0.0.1 (results viewable by the logged link)")
    args = p.parse_args(argv)
    from web.heap import one_arena

    one_arena()  # a long-running server on many threads: freed memory goes back (web/heap.py)

    import logging
    import signal
    import threading

    from ich.settings import load_settings
    from ich.study import StudyError
    from models import runtime as rt
    from models.checkpoint import CheckpointError
    from models.predict_split import InferenceError
    from node.config import load_node_config
    from node.service import DicomNode, engine_runner
    from pipeline.engine import Engine
    from pipeline.study import model_info
    from stacking.config import load_predict_config
    from stacking.run import StackingError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    with friendly_errors(InferenceError, CheckpointError, StackingError, StudyError, FileNotFoundError, OSError):
        settings = load_settings(args.settings)
        cfg = load_predict_config(args.config)
        node_cfg = load_node_config(args.node_config, settings.logs_dir)
        if args.web_port:  # the web app's engine (loaded once) runs the node's series too
            from web.app import create_app, quiet_logs
            from web.engine import load_engine
            from web.store import stored_study

            quiet_logs()
            web_engine = load_engine(args.settings, args.config)
            app = create_app(engine=web_engine)
            store = app.state.server.store
            node_cfg.viewer_url = node_cfg.viewer_url or f"http://127.0.0.1:{args.web_port}"
            node = DicomNode(node_cfg, web_engine.predict_files, web_engine.model,
                             store_add=lambda result: store.add(stored_study(result)))
            close = web_engine.close
        else:
            runtime = rt.setup(cfg.amp, True)
            engine = Engine(cfg, settings.model_checkpoint_dir, runtime, train_dir=settings.train_clean_dir)
            node = DicomNode(node_cfg, engine_runner(engine),
                             model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir))
            close = engine.close
        node.start()
    print(f"DICOM node {node_cfg.ae_title} on {node_cfg.host}:{node_cfg.port} ({cfg.name}: "
          f"{', '.join(cfg.experiments)}) - research use only, not for clinical use", flush=True)
    try:
        if args.web_port:
            import uvicorn
            print(f"web app on {node_cfg.viewer_url}/", flush=True)
            uvicorn.run(app, host="127.0.0.1", port=args.web_port, log_level="warning", log_config=None,
                        lifespan="on")  # until SIGTERM/Ctrl-C
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *a: stop.set())
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        close()


if __name__ == "__main__":
    main()
