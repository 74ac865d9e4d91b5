"""SETTINGS.json: every path the entry points read.

Kaggle's winning-model template keys. Relative paths resolve against the
folder that holds the settings file, so a checkout works wherever it is cloned
and a Kaggle kernel can point the same keys at /kaggle/input and
/kaggle/working by writing its own settings file.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

KEYS = (
    "RAW_DATA_DIR",
    "TRAIN_DATA_CLEAN_PATH",
    "TEST_DATA_CLEAN_PATH",
    "MODEL_CHECKPOINT_DIR",
    "LOGS_DIR",
    "SUBMISSION_DIR",
)


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Settings:
    path: Path
    raw_data_dir: Path
    train_clean_dir: Path
    test_clean_dir: Path
    model_checkpoint_dir: Path
    logs_dir: Path
    submission_dir: Path


def load_settings(path: str | Path = "SETTINGS.json") -> Settings:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"settings file {path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"settings file {path} must hold a JSON object")
    base = path.resolve().parent
    values = {}
    for key in KEYS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"settings file {path}: key {key} is missing or not a path string")
        p = Path(value).expanduser()
        values[key] = p if p.is_absolute() else (base / p)
    return Settings(
        path=path,
        raw_data_dir=values["RAW_DATA_DIR"],
        train_clean_dir=values["TRAIN_DATA_CLEAN_PATH"],
        test_clean_dir=values["TEST_DATA_CLEAN_PATH"],
        model_checkpoint_dir=values["MODEL_CHECKPOINT_DIR"],
        logs_dir=values["LOGS_DIR"],
        submission_dir=values["SUBMISSION_DIR"],
    )


def require_writable(folders: dict[str, Path]) -> None:
    """Every output folder must be writable before any work starts; say which one is not.

    `folders` maps what the user set (a settings key such as LOGS_DIR, or an
    option such as --out) to the folder. A missing folder is created. The
    check really writes: it creates and deletes a probe file, because
    permission bits do not tell (root ignores them, a read-only mount or an
    immutable folder refuses root too). Without it a read-only output
    folder is found by the last write, e.g. after predict.py ran all of
    stage one and stage two.
    """
    for key, path in folders.items():
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
                pass
        except OSError as exc:
            why = "it is a file, not a folder" if path.is_file() else (exc.strerror or str(exc))
            raise SettingsError(f"{key} points to {path}, which is not a writable folder ({why})") from None
