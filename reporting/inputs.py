"""What the pipeline wrote, found and loaded for the report, or a note saying what to run.

Every loader raises `Unavailable` with the command that would produce the
missing file, so a section can degrade to a one-line note instead of failing.
Loaded tables are cached: several sections read the same files.
"""
from __future__ import annotations

import functools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ich.labels import LABELS
from ich.settings import Settings


class Unavailable(RuntimeError):
    """An input of a section does not exist yet; the message says what to run."""


def _need(path: Path, command: str, note: str = "") -> Path:
    """path, or Unavailable naming the command that writes it."""
    if not path.is_file():
        raise Unavailable(f"{path} not found: run `{command}`{note}")
    return path


@dataclass
class Commands:
    """The commands a user would run, with their own --settings / --config spelled out."""
    settings: str
    predict_config: str

    def _with_settings(self, *args: str) -> str:
        extra = [] if self.settings == "SETTINGS.json" else ["--settings", self.settings]
        return shlex.join(["python", *args[:1], *extra, *args[1:]])

    def prepare(self, split: str | None = None) -> str:
        return self._with_settings("prepare_data.py", *(["--split", split] if split else []))

    def train(self, experiment: str) -> str:
        return self._with_settings("train.py", "--config", f"configs/{experiment}.yaml")

    def predict(self) -> str:
        return self._with_settings("predict.py", "--config", self.predict_config)


class Inputs:
    """Lazy, cached access to the pipeline's outputs for one settings file and predict config."""

    def __init__(self, settings: Settings, cfg, commands: Commands):
        self.settings, self.cfg, self.commands = settings, cfg, commands
        self.experiments: list[str] = list(cfg.experiments)
        self.stack_name: str = cfg.name

    # --- prepare_data outputs ---------------------------------------------------------------
    def clean_dir(self, split: str) -> Path:
        return self.settings.train_clean_dir if split == "train" else self.settings.test_clean_dir

    @functools.cache
    def slices(self, split: str = "train") -> pd.DataFrame:
        path = _need(self.clean_dir(split) / "slices.parquet", self.commands.prepare(split))
        return pd.read_parquet(path)

    @functools.cache
    def rejected(self, split: str) -> pd.DataFrame:
        path = _need(self.clean_dir(split) / "rejected.csv", self.commands.prepare(split))
        return pd.read_csv(path)

    @functools.cache
    def cache_meta(self, split: str = "train") -> dict:
        d = self.clean_dir(split)
        if not (d / "cache_meta.json").is_file() or not (d / "images.npy").is_file():
            raise Unavailable(f"no image cache in {d}: run `{self.commands.prepare(split)}`")
        return json.loads((d / "cache_meta.json").read_text())

    def windows(self, split: str = "train") -> list[str]:
        """Names of the cache's channels, in order (e.g. brain, subdural, bone)."""
        return [str(w[0]) for w in self.cache_meta(split).get("windows", [])]

    # --- stage one ----------------------------------------------------------------------------
    def exp_dir(self, experiment: str) -> Path:
        return self.settings.model_checkpoint_dir / experiment

    @functools.cache
    def oof(self, experiment: str) -> np.ndarray:
        """Stage-one OOF probabilities of one experiment, rows aligned with train slices."""
        path = _need(self.exp_dir(experiment) / "oof.parquet", self.commands.train(experiment), " (every fold)")
        return self._aligned(path)

    def available_oofs(self) -> dict[str, np.ndarray]:
        out = {}
        for exp in self.experiments:
            try:
                out[exp] = self.oof(exp)
            except Unavailable:
                pass
        return out

    def stage_one(self) -> tuple[str, np.ndarray]:
        """(name, probabilities) of stage one: the experiment, or the mean of several."""
        oofs = {exp: self.oof(exp) for exp in self.experiments}  # each must exist
        if len(oofs) == 1:
            return f"stage one ({self.experiments[0]})", oofs[self.experiments[0]]
        return f"stage one (mean of {', '.join(self.experiments)})", np.mean(list(oofs.values()), axis=0)

    def experiment_config(self, experiment: str) -> dict:
        path = _need(self.exp_dir(experiment) / "config.json", self.commands.train(experiment))
        return json.loads(path.read_text())

    def fold_checkpoint(self, experiment: str, fold: int) -> Path:
        return _need(self.exp_dir(experiment) / f"fold{fold}.pt", self.commands.train(experiment))

    def history(self, experiment: str) -> pd.DataFrame:
        path = _need(self.settings.logs_dir / experiment / "history.csv", self.commands.train(experiment))
        return pd.read_csv(path)

    # --- stage two ----------------------------------------------------------------------------
    @property
    def stack_dir(self) -> Path:
        return self.settings.model_checkpoint_dir / "stacking" / self.stack_name

    @property
    def stack_log_dir(self) -> Path:
        return self.settings.logs_dir / "stacking" / self.stack_name

    @functools.cache
    def stage_two(self) -> np.ndarray:
        path = self.stack_dir / "oof.parquet"
        if not path.is_file():
            raise Unavailable(f"stage two has not run for {self.stack_name} ({path} not found): "
                              f"run `{self.commands.predict()}`")
        return self._aligned(path)

    def metrics_csv(self) -> pd.DataFrame:
        path = _need(self.stack_log_dir / "metrics.csv", self.commands.predict())
        return pd.read_csv(path, index_col=0)

    # --- helpers ------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        return self.slices("train")[list(LABELS)].to_numpy(np.float64)

    def _aligned(self, path: Path) -> np.ndarray:
        ids = self.slices("train")["image_id"]
        table = pd.read_parquet(path)
        pos = pd.Series(np.arange(len(table)), index=table["image_id"].to_numpy())
        missing = ~ids.isin(pos.index)
        if missing.any():
            raise Unavailable(f"{path} lacks {int(missing.sum())} of the {len(ids)} train images "
                              "(written for another slices.parquet?): rerun the stage that wrote it")
        return table[list(LABELS)].to_numpy(np.float64)[pos.loc[ids].to_numpy()]
