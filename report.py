#!/usr/bin/env python
"""One self-contained HTML page about the pipeline's data, models and errors (see entry_points.md)."""
import sys
from pathlib import Path

from ich.cli import friendly_errors, parser
from ich.settings import load_settings, require_writable


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--config", default="configs/predict/default.yaml",
                   help="predict config naming the experiments and the stage-two run (default: %(default)s)")
    p.add_argument("--out", default=None, help="where to write the HTML page (default: LOGS_DIR/report/report.html)")
    p.add_argument("--no-progress", action="store_true",
                   help="no effect (the report draws no progress bars); accepted like the other entry points")
    args = p.parse_args(argv)

    from reporting import build_report

    with friendly_errors():
        print(f"report: {args.settings}, {args.config}")
        outputs = {"LOGS_DIR": load_settings(args.settings).logs_dir}  # the figures go to LOGS_DIR/report
        if args.out:
            outputs["--out"] = Path(args.out).absolute().parent
        require_writable(outputs)
        result = build_report(args.settings, args.config, args.out)
    if result.missing:
        print(f"sections not available yet (their inputs are missing): {', '.join(result.missing)}")
    print(f"report written in {result.seconds:.0f} s (figures in {result.png_dir}):")
    print(result.path)
    if result.failed:
        print(f"error: section(s) {', '.join(result.failed)} failed (traceback above); the page shows the rest",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
