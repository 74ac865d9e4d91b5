"""models/optim.py: one optimizer factory (optim.name) and one schedule table, shared by the trainer,
the LR finder and benchmarks/train_step.py."""
import numpy as np
import pytest
import torch

from ich.config import ConfigError
from ich.labels import LABELS
from models.config import from_dict
from models.net import SliceNet
from models.optim import OPTIMIZERS, SCHEDULES, create_optimizer, param_groups
from models.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"))


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                       ("sgd", torch.optim.SGD)])
def test_each_name_builds_its_optimizer_with_the_config_values(name, cls):
    from models.trainer import build_optimizer
    cfg = from_dict({"model": {"backbone": "test_resnet"},
                     "optim": {"name": name, "lr": 0.003, "weight_decay": 0.02, "momentum": 0.8}})
    model = SliceNet("test_resnet")
    opt = build_optimizer(cfg, model, CPU)
    assert type(opt) is cls
    backbone, head = opt.param_groups  # the two groups the schedule drives: backbone, then head
    assert [id(p) for p in backbone["params"]] == [id(p) for p in model.backbone_parameters()]
    assert [id(p) for p in head["params"]] == [id(p) for p in model.head_parameters()]
    for group in opt.param_groups:
        assert group["lr"] == 0.003 and group["weight_decay"] == 0.02
        assert not group.get("fused")  # fused only on CUDA
        if name == "sgd":
            assert group["momentum"] == 0.8 and group["nesterov"] is False
    assert create_optimizer(param_groups(model), cfg.optim, lr=1e-6).param_groups[1]["lr"] == 1e-6  # LR finder


def test_tables_match_the_config_choices():
    from models import config
    assert list(OPTIMIZERS) == list(config.OPTIMIZERS) == ["adamw", "adam", "sgd"]
    assert list(SCHEDULES) == list(config.SCHEDULES) == ["cosine", "onecycle", "step"]
    assert from_dict({"model": {"backbone": "test_resnet"}}).optim.name == "adamw"
    with pytest.raises(ConfigError, match=r"optim.name must be one of adamw, adam, sgd, got 'Adam'"):
        from_dict({"model": {"backbone": "test_resnet"}, "optim": {"name": "Adam"}})
    with pytest.raises(ConfigError, match="optim.nesterov needs optim.momentum > 0"):
        from_dict({"model": {"backbone": "test_resnet"}, "optim": {"name": "sgd", "momentum": 0, "nesterov": True}})


def test_lr_finder_and_trainer_build_the_same_optimizer_loss_and_scaler(prepared, tmp_path, monkeypatch):
    """Before: the LR finder had its own AdamW (one group), a loss without loss.pos_weight, and no GradScaler."""
    import models.trainer as trainer
    from models.experiment import load_train_table
    from models.lr_finder import find_lr

    built = {"optimizer": [], "loss": [], "scaler": []}
    def recording(make):
        def build(*args, **kwargs):
            built["optimizer"].append(make(*args, **kwargs))
            return built["optimizer"][-1]
        return build

    for name, make in list(OPTIMIZERS.items()):  # the one table both reach
        monkeypatch.setitem(OPTIMIZERS, name, recording(make))

    class Loss(trainer.WeightedBCE):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built["loss"].append(self)

    class Scaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built["scaler"].append(self)

    monkeypatch.setattr(trainer, "WeightedBCE", Loss)
    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)

    clean = prepared / "clean" / "train"
    slices = load_train_table(clean)
    cfg = from_dict({"model": {"backbone": "test_resnet"}, "input": {"size": 32},
                     "augment": {"hflip": 0.0, "shift_scale_rotate": 0.0},
                     "loss": {"pos_weight": True, "any_weight": 3.0},
                     "optim": {"name": "sgd", "lr": 0.01, "weight_decay": 0.001, "momentum": 0.5},
                     "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "amp": "none", "compile": "false"}})
    find_lr(cfg, slices, clean, CPU, tmp_path / "lr.png", steps=3, progress=False)
    data = trainer.FoldData(train=slices, valid=slices[slices.fold == 0], clean_dir=clean)
    trainer.train_fold(cfg, 0, data, tmp_path, CPU, resume=False, progress=False, log=lambda *a: None)

    (finder_opt, trainer_opt), (finder_loss, trainer_loss) = built["optimizer"], built["loss"]
    assert type(finder_opt) is type(trainer_opt) is torch.optim.SGD
    assert len(finder_opt.param_groups) == len(trainer_opt.param_groups) == 2
    for a, b in zip(finder_opt.param_groups, trainer_opt.param_groups):
        assert (a["weight_decay"], a["momentum"], a["nesterov"]) == (b["weight_decay"], b["momentum"], b["nesterov"])
    torch.testing.assert_close(finder_loss.weights, trainer_loss.weights)
    assert finder_loss.pos_weight is not None  # the finder's loss now has the trainer's positive weights
    torch.testing.assert_close(finder_loss.pos_weight, trainer_loss.pos_weight)
    y = slices[list(LABELS)].to_numpy(np.float32)
    pos = y.sum(0).clip(min=1)
    np.testing.assert_allclose(trainer_loss.pos_weight.numpy(), (len(y) - pos) / pos, rtol=1e-6)
    assert len(built["scaler"]) == 2 and built["scaler"][0].is_enabled() == built["scaler"][1].is_enabled()
