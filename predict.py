#!/usr/bin/env python
"""Stage one on the test set, stage two, then SUBMISSION_DIR/submission.csv (see entry_points.md)."""
from ich.cli import friendly_errors, parser
from ich.settings import load_settings, require_writable

KAGGLE = "rsna-intracranial-hemorrhage-detection"


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml", help="experiments + stage-two config")
    p.add_argument("--stage1-only", action="store_true", help="submit the mean of the stage-one models (no stacking)")
    p.add_argument("--force", action="store_true", help="recompute cached stage-one test predictions")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--study", help="one study (folder or .zip of DICOMs): per-slice probabilities, no submission")
    p.add_argument("--out", help="with --study: output folder (default LOGS_DIR/study)")
    args = p.parse_args(argv)

    import dataclasses

    import numpy as np
    import pandas as pd

    from ich import provenance
    from ich.cache import read_meta
    from ich.labels import LABELS
    from ich.study import StudyError
    from ich.submission import (SubmissionError, build_submission, read_sample, score_submission,
                                write_submission)
    from models import runtime as rt
    from models.predict_split import InferenceError, check_same_cache, predict_test, training_records
    from stacking.config import load_predict_config
    from stacking.run import StackingError, run_stacking

    with friendly_errors(SubmissionError, InferenceError, StackingError, StudyError, FileNotFoundError):
        settings = load_settings(args.settings)
        cfg = load_predict_config(args.config)
        if args.study:  # the study path: same reading, stage one and stage two as below (pipeline/study.py)
            from pipeline.study import study_cli
            return study_cli(args.study, args.out, settings, cfg)
        # stage one and two take hours on the real data: find a read-only output folder now, not at the last write
        require_writable({"MODEL_CHECKPOINT_DIR": settings.model_checkpoint_dir, "LOGS_DIR": settings.logs_dir,
                          "SUBMISSION_DIR": settings.submission_dir})
        raw, test_dir, train_dir = settings.raw_data_dir, settings.test_clean_dir, settings.train_clean_dir
        sample = read_sample(raw / "stage_2_sample_submission.csv")
        for d, split in ((train_dir, "train"), (test_dir, "test")):
            if not (d / "slices.parquet").is_file():
                raise FileNotFoundError(f"{d / 'slices.parquet'} not found: run prepare_data.py --split {split}")
        train_slices = pd.read_parquet(train_dir / "slices.parquet")
        test_slices = pd.read_parquet(test_dir / "slices.parquet")
        rejected = pd.read_csv(test_dir / "rejected.csv") if (test_dir / "rejected.csv").is_file() else None
        prior = train_slices[list(LABELS)].mean().to_numpy()

        check_same_cache(train_dir, test_dir)
        trained = training_records(settings.model_checkpoint_dir, cfg.experiments, train_dir)
        runtime = rt.setup(cfg.amp, True)
        device = runtime.describe()
        try:
            stage1 = {exp: predict_test(settings.model_checkpoint_dir / exp, test_dir, runtime,
                                        batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers, force=args.force,
                                        progress=not args.no_progress)
                      for exp in cfg.experiments}
        finally:
            rt.teardown()
        mean1 = stage1[cfg.experiments[0]][["image_id"]].copy()
        mean1[list(LABELS)] = np.mean([t[list(LABELS)].to_numpy() for t in stage1.values()], axis=0)
        subs = {"stage one": build_submission(sample, mean1, prior=prior, test_slices=test_slices,
                                              rejected=rejected, clip=cfg.clip)}
        if not args.stage1_only:
            result = run_stacking(cfg, train_slices=train_slices, test_slices=test_slices,
                                  model_dir=settings.model_checkpoint_dir, logs_dir=settings.logs_dir,
                                  progress=not args.no_progress)
            members = result["member_tests"] if len(result["member_tests"]) > 1 else {}
            for name, preds in [*((f"stage two: {m}", t) for m, t in members.items()), ("stage two", result["test"])]:
                subs[name] = build_submission(sample, preds, prior=prior, test_slices=test_slices,
                                              rejected=rejected, clip=cfg.clip)
        final = "stage one" if args.stage1_only else "stage two"
        name = "submission_stage1.csv" if args.stage1_only else "submission.csv"
        sub, stats = subs[final]
        path = write_submission(sub, settings.submission_dir / name)
        made_by = {**provenance.record(dataclasses.asdict(cfg), device, test_dir), "kind": final,
                   "train_cache_files_digest": (read_meta(train_dir) or {}).get("files_digest"),
                   "experiments": trained}
        record_path = provenance.write_sidecar(path, made_by)
        print(f"\nsubmission ({final}): {path}  ({len(sub)} rows; {stats.line()})")
        print(f"made by: {provenance.summary(made_by)} -> {record_path}")
        labels_csv = raw / "stage_2_test_labels.csv"
        if labels_csv.is_file():
            scores = {k: score_submission(s, labels_csv) for k, (s, _) in subs.items()}
            print("test weighted log loss (labels known): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
        print(f"submit: kaggle competitions submit -c {KAGGLE} -f {path} -m \"{cfg.name}\"")


if __name__ == "__main__":
    main()
