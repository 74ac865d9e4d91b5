#!/usr/bin/env python
"""The DICOM node: a scanner or PACS sends a study (C-STORE), the model's DICOM SR goes back.

Research use only - not for clinical use. Listens where configs/node/*.yaml says (default
127.0.0.1:11112), accepts only the calling AE titles (and hosts) listed there, and sends each
series' SR to the configured C-STORE destinations and/or STOW-RS URL (README, "Connecting to a PACS").
Stop it with Ctrl-C or SIGTERM; what it received and did not answer yet is processed at the next start.
"""
from ich.cli import friendly_errors, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--node-config", default="configs/node/orthanc.yaml", help="the node's config")
    args = p.parse_args(argv)

    import logging
    import signal
    import threading

    from ich.settings import load_settings
    from ich.study import StudyError
    from models import runtime as rt
    from models.predict_split import InferenceError
    from node.config import load_node_config
    from node.service import DicomNode, engine_runner
    from pipeline.engine import Engine
    from pipeline.study import model_info
    from stacking.config import load_predict_config
    from stacking.run import StackingError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    with friendly_errors(InferenceError, StackingError, StudyError, FileNotFoundError, OSError):
        settings = load_settings(args.settings)
        cfg = load_predict_config(args.config)
        node_cfg = load_node_config(args.node_config, settings.logs_dir)
        runtime = rt.setup(cfg.amp, True)
        engine = Engine(cfg, settings.model_checkpoint_dir, runtime, train_dir=settings.train_clean_dir)
        node = DicomNode(node_cfg, engine_runner(engine),
                         model_info(cfg, settings.model_checkpoint_dir, settings.logs_dir))
        node.start()
    print(f"DICOM node {node_cfg.ae_title} on {node_cfg.host}:{node_cfg.port} ({cfg.name}: "
          f"{', '.join(cfg.experiments)}) - research use only, not for clinical use", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        engine.close()


if __name__ == "__main__":
    main()
