"""train.average_last: fold{k}.pt is the mean of the last N epochs' weights, BatchNorm recomputed."""
import pandas as pd
import pytest
import torch

from conftest import dies_in_epoch, write_config
from ich.config import ConfigError
from models.config import from_dict, load_experiment
from models.data import with_neighbors


def test_average_last_equals_a_hand_made_average_with_batchnorm_recomputed(prepared, tmp_path, monkeypatch):
    from models import experiment, trainer
    from models.net import SliceNet
    from models.runtime import setup
    cfg = load_experiment(write_config(tmp_path, "avg", train={"epochs": 3, "average_last": 2}))
    epochs = []
    real = trainer.run_epoch

    def record(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        epochs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return loss

    monkeypatch.setattr(trainer, "run_epoch", record)
    logs = []
    clean = prepared / "clean" / "train"
    experiment.run_experiment(cfg, clean_dir=clean, model_dir=tmp_path / "m", logs_dir=tmp_path / "l",
                              runtime=setup("none", False), folds=[0], progress=False, log=logs.append)
    assert len(epochs) == 3
    kept = torch.load(tmp_path / "m" / "avg" / "fold0.pt", weights_only=True)
    state = kept["state_dict"]
    assert kept["average_last"] == 2 and kept["epoch"] == 3

    bn_stats = {k for k in state if k.endswith(("running_mean", "running_var"))}
    assert bn_stats  # test_resnet has BatchNorm
    for key, value in state.items():
        if key in bn_stats or not value.is_floating_point():
            continue
        torch.testing.assert_close(value, (epochs[1][key] + epochs[2][key]) / 2, msg=key)
    assert not torch.equal(state["head.weight"], epochs[2]["head.weight"])

    # BatchNorm statistics: torch's own update_bn over the same training images, on the averaged weights
    net = SliceNet("test_resnet")
    net.load_state_dict(state)
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    train = slices[slices["fold"] != 0]
    assert len(train) <= trainer.BN_BATCHES * cfg.train.batch_size  # all of them, in table order
    dataset = trainer.make_dataset(cfg, train, clean, cfg.final_size, train=False)
    images = [((x.float() - net.mean) / net.std,) for x, _, _ in
              torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size)]
    torch.optim.swa_utils.update_bn(images, net.backbone)
    expected = net.state_dict()
    for key in bn_stats:
        torch.testing.assert_close(state[key], expected[key], msg=key)
        assert not torch.allclose(state[key], (epochs[1][key] + epochs[2][key]) / 2), key  # not merely averaged

    # OOF came from the averaged model
    assert any("weights of epochs 2-3 averaged, BatchNorm recomputed" in line for line in logs), logs
    oof = pd.read_parquet(tmp_path / "m" / "avg" / "fold0.oof.parquet")
    net.eval()
    valid_ids = slices[slices["fold"] == 0]["image_id"].head(4).tolist()
    assert oof["image_id"].head(4).tolist() == valid_ids
    valid_set = trainer.make_dataset(cfg, slices[slices["fold"] == 0], clean, cfg.final_size, train=False)
    x = torch.stack([valid_set[i][0] for i in range(4)])
    with torch.no_grad():
        p = (net.probabilities(net(x)) + net.probabilities(net(torch.flip(x, dims=[3])))) / 2
    torch.testing.assert_close(torch.tensor(oof.iloc[:4, 1:].to_numpy()), p, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("data, message", [
    ({"train": {"epochs": 3, "average_last": 4}}, "between 1 and train.epochs"),
    ({"train": {"epochs": 3, "average_last": 2, "checkpoint": "best"}}, "checkpoint: last"),
    ({"input": {"progressive": [[32, 2], [64, 1]]}, "train": {"epochs": 3, "average_last": 2}}, "final input size"),
])
def test_average_last_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_average_last_resumed_inside_the_window_matches_uninterrupted(prepared, tmp_path, monkeypatch):
    """The running sum of the averaged epochs is part of the resume state (train_fold on a part of fold 0)."""
    from models import trainer
    from models.runtime import setup
    cfg = load_experiment(write_config(tmp_path, "avgres", augment={"hflip": 0.0},
                                       train={"epochs": 3, "average_last": 2}))
    clean = prepared / "clean" / "train"
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    data = trainer.FoldData(train=slices[slices["fold"] != 0].iloc[:64], valid=slices[slices["fold"] == 0].iloc[:32],
                            clean_dir=clean)
    runtime = setup("none", False)

    def train(out, resume=False):
        out.mkdir(exist_ok=True)
        trainer.train_fold(cfg, 0, data, out, runtime, resume=resume, progress=False, log=lambda *a: None)

    train(tmp_path / "straight")
    real = dies_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed")
    monkeypatch.setattr(trainer, "run_epoch", real)
    state = torch.load(tmp_path / "killed" / "fold0.last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["avg_sum"] is not None  # epoch 2 (0-based 1) is in the sum
    train(tmp_path / "killed", resume=True)
    a = torch.load(tmp_path / "straight" / "fold0.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "fold0.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
