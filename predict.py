#!/usr/bin/env python
"""Stage one on the test set, stage two, then SUBMISSION_DIR/submission.csv (see entry_points.md).

Without a test image cache in TEST_DATA_CLEAN_PATH the test DICOMs are streamed through the in-memory
engine and no image is written (pipeline.batch); --study runs one study (pipeline.study)."""
from ich.cli import friendly_errors, parser
from ich.settings import load_settings


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--stage1-only", action="store_true", help="submit the mean of the stage-one models (no stacking)")
    p.add_argument("--force", action="store_true", help="recompute cached stage-one test predictions")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--study", help="one study (folder or .zip of DICOMs): per-slice probabilities, no submission")
    p.add_argument("--out", help="with --study: output folder (default LOGS_DIR/study)")
    args = p.parse_args(argv)

    from ich.prepare import PrepareError
    from ich.study import StudyError
    from ich.submission import SubmissionError
    from models.checkpoint import CheckpointError
    from models.predict_split import InferenceError
    from stacking.config import load_predict_config
    from stacking.run import StackingError

    with friendly_errors(SubmissionError, InferenceError, CheckpointError, StackingError, StudyError, PrepareError,
                         FileNotFoundError):
        settings = load_settings(args.settings)
        cfg = load_predict_config(args.config)
        if args.study:
            from pipeline.study import study_cli
            return study_cli(args.study, args.out, settings, cfg)
        from pipeline.batch import predict
        return predict(settings, cfg, stage1_only=args.stage1_only, force=args.force, progress=not args.no_progress)


if __name__ == "__main__":
    main()
