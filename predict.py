#!/usr/bin/env python
"""Stage one on test, stage two, submission.csv (not built yet: issue "Stage two and predict.py")."""
import sys

if __name__ == "__main__":
    print("predict.py is not built yet: see entry_points.md for what exists today.", file=sys.stderr)
    sys.exit(3)
