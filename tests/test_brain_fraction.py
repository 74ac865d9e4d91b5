"""sampler.min_brain_fraction: training skips near-empty slices; validation and OOF still cover every slice."""
import numpy as np
import pandas as pd
import pytest

from conftest import write_config
from ich.config import ConfigError
from models.config import from_dict, load_experiment
from models.data import EpochSampler


def test_sampler_draws_eligible_items_only():
    labels = np.array([1] * 10 + [0] * 90)
    eligible = np.arange(100) % 4 != 0  # 75 items: 7 positives, 68 negatives
    s = EpochSampler(labels, seed=0, eligible=eligible)
    assert len(s) == 75 and sorted(s.epoch_indices()) == list(np.flatnonzero(eligible))
    b = EpochSampler(labels, kind="balanced", neg_ratio=2.0, seed=0, eligible=eligible)
    idx = b.epoch_indices()
    assert len(idx) == len(b) == 7 + 14 and eligible[idx].all() and labels[idx].sum() == 7
    assert b.neg_keep == pytest.approx(14 / 68)
    plain = EpochSampler(labels, seed=3)
    same = EpochSampler(labels, seed=3, eligible=np.ones(100, bool))
    assert (plain.epoch_indices() == same.epoch_indices()).all()  # the default draws as before


def test_training_skips_slices_below_min_brain_fraction_oof_covers_all(prepared, tmp_path, monkeypatch):
    from models import data, experiment
    from models.runtime import setup
    clean = prepared / "clean" / "train"
    slices = pd.read_parquet(clean / "slices.parquet")
    train = slices[slices["fold"] != 0].reset_index(drop=True)
    low = train["brain_fraction"].to_numpy() < 0.2
    assert 0 < low.sum() < len(train)  # the generated heads have slices above and below the brain
    drawn = []
    real = data.EpochSampler.epoch_indices

    def record(self):
        idx = real(self)
        if self.tagged:  # the training sampler (evaluation loaders are untagged)
            drawn.append(idx)
        return idx

    monkeypatch.setattr(data.EpochSampler, "epoch_indices", record)
    cfg = load_experiment(write_config(tmp_path, "brain", sampler={"min_brain_fraction": 0.2},
                                       train={"epochs": 2}))
    logs = []
    experiment.run_experiment(cfg, clean_dir=clean, model_dir=tmp_path / "m", logs_dir=tmp_path / "l",
                              runtime=setup("none", False), folds=[0], progress=False, log=logs.append)
    assert len(drawn) == 2
    for idx in drawn:
        assert not low[idx].any() and len(set(idx)) == (~low).sum()
    assert any(f"training on {(~low).sum()} of {len(train)} slices" in line for line in logs), logs
    oof = pd.read_parquet(tmp_path / "m" / "brain" / "fold0.oof.parquet")
    assert oof["image_id"].tolist() == slices.loc[slices["fold"] == 0, "image_id"].tolist()


def test_min_brain_fraction_config_errors():
    assert from_dict({}).sampler.min_brain_fraction == 0
    with pytest.raises(ConfigError, match="min_brain_fraction must be in"):
        from_dict({"sampler": {"min_brain_fraction": 1.5}})
