#!/usr/bin/env python
"""Raw Kaggle data (its folder, or the .zip as downloaded) -> clean slice tables and image caches
(see entry_points.md)."""
from ich.cli import friendly_errors, parser
from ich.config import load_prepare_config
from ich.prepare import PrepareError, prepare_split
from ich.settings import load_settings, require_writable


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/prepare/default.yaml", help="prepare config (YAML)")
    p.add_argument("--split", choices=["train", "test", "both"], default="both")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished or different cache exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    with friendly_errors(PrepareError):
        settings = load_settings(args.settings)
        cfg = load_prepare_config(args.config)
        raw = settings.raw_data_dir  # a folder or the competition .zip (ich.rawdata)
        splits = ["train", "test"] if args.split == "both" else [args.split]
        outputs = {"train": ("TRAIN_DATA_CLEAN_PATH", settings.train_clean_dir),
                   "test": ("TEST_DATA_CLEAN_PATH", settings.test_clean_dir)}
        require_writable(dict(outputs[split] for split in splits))  # before any work, not at the first write
        for split in splits:
            summary = prepare_split(raw, outputs[split][1], split, cfg, force=args.force, progress=not args.no_progress)
            print("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
