#!/usr/bin/env python
"""Stage one: train K-fold timm CNNs on the image cache, or straight from the DICOMs (input.source: dicom;
RAW_DATA_DIR a folder or the competition zip); see entry_points.md.

Several GPUs: torchrun --nproc_per_node=N train.py --config ... (same outputs).
"""
import argparse

from ich.cli import friendly_errors, parser
from ich.settings import load_settings, require_writable


def fold_list(text: str) -> list[int]:
    """--folds 0,2 -> [0, 2]; anything else is a usage error, not a traceback."""
    try:
        folds = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        folds = []
    if not folds or min(folds) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers such as 0,2, got {text!r}")
    return folds


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", required=True, help="experiment config, e.g. configs/demo_cpu.yaml")
    p.add_argument("--folds", type=fold_list, default=None, help="comma-separated folds to train (default: all)")
    p.add_argument("--resume", action="store_true", help="continue killed folds, skip finished ones")
    p.add_argument("--force", action="store_true", help="retrain the requested folds from scratch")
    p.add_argument("--lr-find", action="store_true", help="run the learning-rate finder instead of training")
    p.add_argument("--lr-steps", type=int, default=200, help="batches in the learning-rate finder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from ich.rawdata import RawDataError
    from models.experiment import TrainError, load_train_table, run_experiment, stage_one_images
    from models.net import MissingWeightsError
    with friendly_errors(TrainError, MissingWeightsError, RawDataError):
        from models import runtime as rt
        from models.config import load_experiment
        settings = load_settings(args.settings)
        cfg = load_experiment(args.config)
        outputs = {"LOGS_DIR": settings.logs_dir}
        if not args.lr_find:
            outputs = {"MODEL_CHECKPOINT_DIR": settings.model_checkpoint_dir, **outputs}
        require_writable(outputs)  # before any work (and before config.json): say which folder, in one line
        folds = args.folds
        runtime = rt.setup(cfg.train.amp, cfg.train.channels_last)
        log = print if runtime.is_main else (lambda *a, **k: None)
        try:
            log(f"{cfg.name}: {cfg.model.backbone} at {cfg.final_size} px, input {cfg.input.mode}, "
                f"device {runtime.device}" + (f" x {runtime.world_size} processes" if runtime.distributed else ""))
            if args.lr_find:
                from models.lr_finder import find_lr
                slices = load_train_table(settings.train_clean_dir)
                out = find_lr(cfg, slices, settings.train_clean_dir, runtime,
                              settings.logs_dir / cfg.name / "lr_finder.png", steps=args.lr_steps,
                              progress=not args.no_progress,
                              images=stage_one_images(cfg, settings.train_clean_dir, settings.raw_data_dir, slices))
                log(f"suggested lr {out['suggested_lr']:.2e} (steepest descent); plot: {out['plot']}")
                return
            run_experiment(cfg, clean_dir=settings.train_clean_dir, model_dir=settings.model_checkpoint_dir,
                           logs_dir=settings.logs_dir, runtime=runtime, folds=folds, resume=args.resume,
                           force=args.force, progress=not args.no_progress, log=log, raw_dir=settings.raw_data_dir)
        finally:
            rt.teardown()


if __name__ == "__main__":
    main()
