#!/usr/bin/env python
"""Stage one: K-fold timm CNNs on the image cache (not built yet: issue "Stage one")."""
import sys

if __name__ == "__main__":
    print("train.py is not built yet: stage one is the next issue. See entry_points.md.", file=sys.stderr)
    sys.exit(3)
