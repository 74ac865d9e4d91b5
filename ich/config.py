"""Experiment and preparation configs: YAML files in configs/, validated on load.

Configs hold every knob (windows, sizes, folds, ...) so entry points need few
flags and a run is reproducible from the file alone. Unknown keys are errors:
a typo must not silently fall back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .image import Window


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and key."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


DEFAULT_WINDOWS = (
    Window("brain", 40, 80),
    Window("subdural", 80, 200),
    Window("bone", 40, 380),
)


@dataclass(frozen=True)
class PrepareConfig:
    """What prepare_data writes into the image cache, and how folds are drawn."""

    image_size: int = 256
    windows: tuple = DEFAULT_WINDOWS
    sigmoid: bool = False
    crop_border: bool = False
    n_folds: int = 5
    fold_seed: int = 42
    n_jobs: int = -1
    chunk_size: int = 256
    name: str = field(default="default", compare=False)

    def cache_key(self) -> dict:
        """The settings an existing cache must match to be reused."""
        return {
            "image_size": self.image_size,
            "windows": [[w.name, w.center, w.width] for w in self.windows],
            "sigmoid": self.sigmoid,
            "crop_border": self.crop_border,
            "chunk_size": self.chunk_size,
        }


def load_prepare_config(path: str | Path | None) -> PrepareConfig:
    if path is None:
        return PrepareConfig()
    data = load_yaml(path)
    known = {f.name for f in fields(PrepareConfig)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = dict(data)
    if "windows" in kwargs:
        try:
            kwargs["windows"] = tuple(
                Window(str(w["name"]), float(w["center"]), float(w["width"])) for w in kwargs["windows"]
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path}: windows must be a list of {{name, center, width}}: {exc}") from exc
        if not kwargs["windows"] or any(w.width <= 0 for w in kwargs["windows"]):
            raise ConfigError(f"{path}: windows must be non-empty with positive widths")
    for key in ("image_size", "n_folds", "fold_seed", "n_jobs", "chunk_size"):
        if key in kwargs and (not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool)):
            raise ConfigError(f"{path}: {key} must be an integer, got {kwargs[key]!r}")
    for key in ("sigmoid", "crop_border"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {kwargs[key]!r}")
    cfg = PrepareConfig(name=Path(path).stem, **kwargs)
    if cfg.image_size < 16 or cfg.n_folds < 2 or cfg.chunk_size < 1:
        raise ConfigError(f"{path}: need image_size >= 16, n_folds >= 2, chunk_size >= 1")
    return cfg
