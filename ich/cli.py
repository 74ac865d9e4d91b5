"""Shared bits of the entry scripts: settings option, clean error exit."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from .config import ConfigError
from .labels import LabelsError
from .settings import SettingsError

# errors that are the user's input, not a bug: print one line, exit 2, no traceback
USER_ERRORS = (SettingsError, ConfigError, LabelsError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--settings", default="SETTINGS.json", help="paths file (default: SETTINGS.json)")
    return p


@contextmanager
def friendly_errors(*extra: type[Exception]):
    """User errors (bad settings, config, labels, plus `extra`) exit 2 with one line on stderr, no traceback."""
    try:
        yield
    except USER_ERRORS + extra as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
