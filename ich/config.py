"""Experiment and preparation configs: YAML files in configs/, validated on load.

Configs hold every knob (windows, sizes, folds, ...) so entry points need few
flags and a run is reproducible from the file alone. Unknown keys are errors:
a typo must not silently fall back to a default.

All three config kinds (prepare here, experiment in models/config.py, predict
in stacking/config.py) are checked the same way, by `check_fields`: the
dataclass's declared field types drive the type check, so a new field is
checked the day it is added, and every mistake reads
`<file>: <section.key> must be <type>, got <value>`. Each kind then checks
its ranges with `need`. A bad value must stop the run at load time, as one
line, before any output is written, not as a traceback hours later.
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
    except yaml.MarkedYAMLError as exc:  # one line: where, then what (PyYAML's own text spans several)
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"config file {path} is not readable YAML: {where}{exc.problem or exc.context}") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


# declared field type -> accepted YAML values, and the word the error message uses for it
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "tuple": list, "dict": dict}
_WORDS = {"tuple": "list", "dict": "mapping"}


def _type_text(f) -> str:
    """A dataclass field's declared type as text: "int", "str | None", ... (annotations may be strings)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def check_value(where: str, key: str, value, type_text: str):
    """One config value against a declared type ("int", "float", "str | None", "list", "dict", ...).

    bool is not an int here (YAML `true` for a batch size is a mistake), an
    int is a float (`lr: 1`), and a float is returned as float. A string
    that reads as a number gets a hint: PyYAML reads `1e-3` (no dot) as text.
    """
    options = [t.strip() for t in type_text.split("|")]
    if value is None and "None" in options:
        return None
    base = next(t for t in options if t != "None")
    if base not in _TYPES:
        raise TypeError(f"no config check for the declared type {type_text!r} of {key}")
    if isinstance(value, _TYPES[base]) and not (isinstance(value, bool) and base != "bool"):
        return float(value) if base == "float" else value
    word = _WORDS.get(base, base) + (" or null" if "None" in options else "")
    shown = "null" if value is None else repr(value)
    hint = ""
    if base in ("int", "float") and isinstance(value, str):
        try:
            float(value)
            hint = " (text, not a number: remove the quotes; YAML reads 1e-3 as text, write 1.0e-3)"
        except ValueError:
            pass
    raise ConfigError(f"{where}: {key} must be {word}, got {shown}{hint}")


def check_fields(cls, data, where: str, *, section: str = "", exclude=()) -> dict:
    """A config mapping -> keyword arguments for dataclass `cls`, every value type-checked.

    The one validation routine of all config kinds. `where` is the file,
    `section` the YAML section the mapping came from ("" for top-level
    keys), `exclude` fields that may not be set from the file. Unknown keys
    are errors that list the known ones.
    """
    prefix = f"{section}." if section else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {section or 'the file'} must be a mapping of keys to values, got {data!r}")
    types = {f.name: _type_text(f) for f in fields(cls) if f.name not in exclude}
    unknown = [k for k in data if k not in types]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; "
                          f"known: {', '.join(prefix + k for k in types)}")
    return {k: check_value(where, prefix + k, v, types[k]) for k, v in data.items()}


def need(ok: bool, where: str, message: str) -> None:
    """A range check of a loaded config: `need(cfg.k >= 0, path, "k must be >= 0, got ...")`."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


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
    max_pixels: int = 4096 * 4096  # Rows x Columns cap, checked before decoding (= ich.dicom.MAX_PIXELS)
    images: bool = True  # false: the slice table, rejected.csv and folds only, no images.npy (input.source: dicom)
    name: str = field(default="default", compare=False)

    def cache_key(self) -> dict:
        """The settings an existing cache must match to be reused."""
        return {
            "image_size": self.image_size,
            "windows": [[w.name, w.center, w.width] for w in self.windows],
            "sigmoid": self.sigmoid,
            "crop_border": self.crop_border,
            "chunk_size": self.chunk_size,
            **({} if self.images else {"images": False}),  # absent when true: caches made before it still match
        }


def load_prepare_config(path: str | Path | None) -> PrepareConfig:
    """configs/prepare/*.yaml -> PrepareConfig; the name is the file's stem, never a key."""
    if path is None:
        return PrepareConfig()
    return prepare_config_from(load_yaml(path), str(path), Path(path).stem)


def cache_settings(meta: dict) -> dict:
    """A cache's cache_meta.json -> the prepare config mapping (YAML shape) that makes images like it:
    what a test split must be prepared with for models trained on that cache."""
    out = {"image_size": int(meta["image_size"]),
           "windows": [{"name": str(n), "center": float(c), "width": float(w)} for n, c, w in meta["windows"]],
           "sigmoid": bool(meta["sigmoid"]), "crop_border": bool(meta["crop_border"])}
    if "chunk_size" in meta:  # a checkpoint's image settings (ich.cache.image_settings) have none
        out["chunk_size"] = int(meta["chunk_size"])
    return out


def prepare_config_from(data: dict, where: str, name: str = "default") -> PrepareConfig:
    """A prepare config mapping (a YAML file's, or cache_settings') -> a checked PrepareConfig."""
    kwargs = check_fields(PrepareConfig, data, where, exclude=("name",))
    if "windows" in kwargs:
        try:
            kwargs["windows"] = tuple(
                Window(str(w["name"]), float(w["center"]), float(w["width"])) for w in kwargs["windows"]
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{where}: windows must be a list of {{name, center, width}}: {exc}") from exc
        need(kwargs["windows"] and all(w.width > 0 for w in kwargs["windows"]), where,
             "windows must be non-empty with positive widths")
    cfg = PrepareConfig(name=name, **kwargs)
    need(cfg.image_size >= 16, where, f"image_size must be >= 16, got {cfg.image_size}")
    need(cfg.n_folds >= 2, where, f"n_folds must be >= 2, got {cfg.n_folds}")
    need(cfg.chunk_size >= 1, where, f"chunk_size must be >= 1, got {cfg.chunk_size}")
    # joblib's convention: -1 = all cores, -2 = all but one, ...; 0 means nothing to joblib
    need(cfg.n_jobs != 0, where, "n_jobs must be a number of worker processes >= 1, or negative to count back "
         "from all cores (-1: all, -2: all but one), got 0")
    return cfg
