"""Stage one: config, dataset, sampler, schedule, network, and train.py end to end."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, dies_in_epoch, run_train, settings_for, write_config
from ich.config import ConfigError
from ich.labels import LABELS
from models.config import OptimCfg, from_dict, load_experiment
from models.data import EpochSampler, SliceDataset, with_neighbors
from models.net import MissingWeightsError, SliceNet
from models.optim import build_scheduler, lr_factor

# --- units ---------------------------------------------------------------------------------

def test_shipped_experiment_configs_load():
    names = [p.name for p in (REPO / "configs").glob("*.yaml")]
    assert "demo_cpu.yaml" in names and len(names) >= 3
    for path in (REPO / "configs").glob("*.yaml"):
        cfg = load_experiment(path)
        assert cfg.name == path.stem


@pytest.mark.parametrize("data, message", [
    ({"train": {"epoch": 3}}, "unknown key.*train.epoch"),
    ({"trian": {}}, "unknown section"),
    ({"train": {"epochs": "3"}}, "train.epochs must be int"),
    ({"input": {"mode": "stack"}}, "input.mode"),
    ({"input": {"progressive": [[64, 1], [128, 1]]}, "train": {"epochs": 3}}, "add up to 2"),
])
def test_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_progressive_sizes():
    cfg = from_dict({"input": {"progressive": [[64, 1], [128, 2]]}, "train": {"epochs": 3}})
    assert [cfg.size_at(e) for e in range(3)] == [64, 128, 128] and cfg.final_size == 128


def test_warns_when_the_network_input_is_larger_than_the_cache(prepared):
    from models.experiment import upsampling_warning
    clean = prepared / "clean" / "train"  # a 64-px cache
    assert upsampling_warning(from_dict({"input": {"size": 64}}), clean) is None
    assert upsampling_warning(from_dict({"input": {"size": 32}}), clean) is None
    grow = from_dict({"input": {"size": 64, "progressive": [[128, 1], [64, 1]]}, "train": {"epochs": 2}})
    assert "up to 128 px" in upsampling_warning(grow, clean) and "is 64 px" in upsampling_warning(grow, clean)


def test_dataset_modes(prepared):
    clean = prepared / "clean" / "train"
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    images = np.load(clean / "images.npy", mmap_mode="r")
    series = slices[slices.n_slices >= 3].series_id.iloc[0]
    s = slices[slices.series_id == series].sort_values("slice_index")
    mid = s.iloc[1]
    i = int(np.flatnonzero(slices.image_id.to_numpy() == mid.image_id)[0])
    assert slices.prev_row.iloc[i] == s.iloc[0].cache_row and slices.next_row.iloc[i] == s.iloc[2].cache_row
    first = s.iloc[0]
    assert slices.loc[slices.image_id == first.image_id, "prev_row"].item() == first.cache_row  # edge repeats

    x, y, idx = SliceDataset(slices, clean, mode="windows", size=64)[i]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and idx == i
    np.testing.assert_array_equal(x.numpy(), images[mid.cache_row].transpose(2, 0, 1))
    assert y.tolist() == mid[list(LABELS)].astype(float).tolist()

    x, _, _ = SliceDataset(slices, clean, mode="adjacent", channel=1, size=32)[i]
    assert x.shape == (3, 32, 32)
    ds = SliceDataset(slices, clean, mode="adjacent", channel=1, size=64)
    stacked = ds.image(i)
    for c, row in enumerate([s.iloc[0].cache_row, mid.cache_row, s.iloc[2].cache_row]):
        np.testing.assert_array_equal(stacked[..., c], images[row][..., 1])


def test_sampler_balanced_and_sharded():
    labels = np.array([1] * 10 + [0] * 90)
    s = EpochSampler(labels, kind="balanced", neg_ratio=2.0, seed=0)
    idx = s.epoch_indices()
    assert len(idx) == len(s) == 30 and labels[idx].sum() == 10
    s.set_epoch(1)
    assert set(s.epoch_indices()) != set(idx)  # negatives redrawn each epoch
    shards = [EpochSampler(labels, seed=0, rank=r, world_size=3).epoch_indices() for r in range(3)]
    assert len({len(x) for x in shards}) == 1 and set(np.concatenate(shards)) == set(range(100))


def test_schedules_and_freeze():
    for kind in ("cosine", "onecycle", "step"):
        cfg = OptimCfg(schedule=kind, warmup_epochs=1, step_epochs=1, step_gamma=0.5)
        f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
        assert max(f) <= 1.0 + 1e-9 and f[-1] < 0.5, kind
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [net.weight]}, {"params": [net.bias]}], lr=1.0)
    sched = build_scheduler(opt, OptimCfg(schedule="cosine"), total_steps=20, steps_per_epoch=10, freeze_epochs=1)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(b == 0 for b, _ in lrs[:10]) and all(b > 0 for b, _ in lrs[10:])
    assert lrs[0][1] == 1.0 and lrs[-1][1] < 0.05


def test_pretrained_weights_from_a_local_file_only(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        SliceNet("test_resnet", str(tmp_path / "nope.pth"))
    import timm
    src = timm.create_model("test_resnet", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    net = SliceNet("test_resnet", str(tmp_path / "w.pth"))
    key = next(k for k in net.backbone.state_dict() if k.endswith("weight"))
    torch.testing.assert_close(net.backbone.state_dict()[key], src.state_dict()[key])
    logits, emb = net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), return_embedding=True)
    assert logits.shape == (2, 6) and emb.shape == (2, net.num_features)


# --- train.py end to end -------------------------------------------------------------------

def test_train_end_to_end_beats_prior(prepared, trained):
    settings, out, tmp_path = trained
    assert "OOF weighted log loss" in out.stdout
    model_dir = tmp_path / "models" / "tiny"
    slices = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    oof = pd.read_parquet(model_dir / "oof.parquet")
    emb = np.load(model_dir / "oof_emb.npy")
    assert oof["image_id"].tolist() == slices["image_id"].tolist()  # every image once, table order
    assert list(oof.columns) == ["image_id", *LABELS]
    assert emb.shape[0] == len(oof) and emb.ndim == 2 and np.isfinite(emb.astype(np.float32)).all()
    for k in range(3):
        ckpt = torch.load(model_dir / f"fold{k}.pt", weights_only=True)
        assert ckpt["config"]["model"]["backbone"] == "test_resnet" and ckpt["fold"] == k
        torch.load(model_dir / f"fold{k}.last.pt", weights_only=True)
    assert (tmp_path / "logs" / "tiny" / "training_curves.png").stat().st_size > 10_000
    history = pd.read_csv(tmp_path / "logs" / "tiny" / "history.csv")
    assert len(history) == 24 and {"val_wlogloss", "val_prior", "train_loss"} <= set(history.columns)

    from ich.metric import prior_baseline, weighted_log_loss
    y = slices[list(LABELS)].to_numpy()
    prior = np.zeros(y.shape)
    for k in range(3):
        held = (slices.fold == k).to_numpy()
        prior[held] = prior_baseline(y[~held], held.sum())
    score, base = weighted_log_loss(y, oof[list(LABELS)].to_numpy()), weighted_log_loss(y, prior)
    assert f"{score:.4f}" in out.stdout and f"{base:.4f}" in out.stdout
    assert score < 0.9 * base, (score, base)

    again = run_train("--settings", settings, "--config", tmp_path / "tiny.yaml")
    assert again.returncode == 2 and "--resume" in again.stderr  # nothing overwritten silently
    again = run_train("--settings", settings, "--config", tmp_path / "tiny.yaml", "--resume")
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 3


def test_resume_after_kill_matches_uninterrupted(prepared, tmp_path, monkeypatch):
    from models import experiment, runtime, trainer
    from models.config import load_experiment as load
    cfg_path = write_config(tmp_path, "resume", augment={"hflip": 0.0}, train={"epochs": 2})
    cfg = load(cfg_path)
    rt = runtime.setup("none", False)
    clean = prepared / "clean" / "train"
    kw = dict(clean_dir=clean, logs_dir=tmp_path / "logs", runtime=rt, folds=[0], progress=False,
              log=lambda *a: None)
    experiment.run_experiment(cfg, model_dir=tmp_path / "straight", **kw)

    real = dies_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cfg, model_dir=tmp_path / "killed", **kw)
    monkeypatch.setattr(trainer, "run_epoch", real)
    assert not (tmp_path / "killed" / "resume" / "fold0.oof.parquet").exists()
    logs = []
    experiment.run_experiment(cfg, model_dir=tmp_path / "killed", resume=True,
                              **{**kw, "log": logs.append})
    assert any("resuming after epoch 1" in line for line in logs)
    a = torch.load(tmp_path / "straight" / "resume" / "fold0.last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "resume" / "fold0.last.pt", weights_only=True)
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], msg=key)


@pytest.mark.parametrize("source, port", [("cache", 29531), ("dicom", 29532)])
def test_torchrun_two_cpu_processes(prepared, tmp_path, source, port):
    """Two processes (gloo) train one epoch and write the whole OOF once; with input.source: dicom both read
    the competition-like zip, each through its own handle, into a clean dir prepared without images: no
    images.npy there to read, and none written anywhere."""
    settings = settings_for(prepared, tmp_path)
    if source == "dicom":
        import json
        import zipfile

        from ich.config import PrepareConfig
        from ich.prepare import prepare_split
        raw = prepared / "raw"
        with zipfile.ZipFile(tmp_path / "data.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(p for p in raw.rglob("*") if p.is_file()):
                z.write(path, path.relative_to(raw).as_posix())
        clean = tmp_path / "clean" / "train"
        prepare_split(tmp_path / "data.zip", clean, "train",
                      PrepareConfig(image_size=64, n_folds=3, n_jobs=1, images=False), progress=False)
        paths = json.loads(settings.read_text())
        settings.write_text(json.dumps({**paths, "RAW_DATA_DIR": str(tmp_path / "data.zip"),
                                        "TRAIN_DATA_CLEAN_PATH": str(clean)}))
    cfg = write_config(tmp_path, "ddp", train={"epochs": 1}, input={"source": source})
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", str(REPO / "train.py"), "--no-progress", "--settings",
                          str(settings), "--config", str(cfg)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stdout and out.stdout.count("OOF weighted log loss") == 1
    oof = pd.read_parquet(tmp_path / "models" / "ddp" / "oof.parquet")
    slices = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    assert oof["image_id"].tolist() == slices["image_id"].tolist()
    assert oof[list(LABELS)].notna().all().all() and (oof[list(LABELS)].to_numpy() > 0).all()
    if source == "dicom":
        assert not list(tmp_path.rglob("images*.npy")) and not list(clean.rglob("*.npy"))


def test_cli_missing_weights_and_lr_finder(prepared, tmp_path):
    settings = settings_for(prepared, tmp_path)
    cfg = write_config(tmp_path, "pre", model={"pretrained": str(tmp_path / "missing_weights.pth")})
    out = run_train("--settings", settings, "--config", cfg)
    assert out.returncode == 2 and "missing_weights.pth" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "models" / "pre" / "config.json").exists()  # checked before any output
    out = run_train("--settings", settings, "--config", write_config(tmp_path, "lr"), "--lr-find", "--lr-steps", "40")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "suggested lr" in out.stdout and (tmp_path / "logs" / "lr" / "lr_finder.png").stat().st_size > 5000


def test_compile_failure_falls_back_to_eager_and_checkpoints_stay_plain(prepared, tmp_path, monkeypatch):
    """train.compile: a compiler that fails at its first call leaves one warning line, and eager results."""
    from models import experiment, net
    from models.config import load_experiment
    from models.runtime import setup

    def broken_compile(module, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no working C++ compiler\nlong inductor log")
        return call

    monkeypatch.setattr(net.torch, "compile", broken_compile)
    cfg = load_experiment(write_config(tmp_path, "comp", train={"epochs": 1, "compile": True}))
    assert cfg.train.compile == "true" and load_experiment(write_config(tmp_path, "c2")).train.compile == "auto"
    rt = setup("none", False)
    assert rt.wants_compile("true") and not rt.wants_compile("auto") and not rt.wants_compile("false")
    logs = []
    experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                              logs_dir=tmp_path / "l", runtime=rt, folds=[0], progress=False, log=logs.append)
    warnings = [line for line in logs if "torch.compile failed" in line]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0] and "\n" not in warnings[0]
    state = torch.load(tmp_path / "m" / "comp" / "fold0.pt", weights_only=True)["state_dict"]
    assert set(state) == set(SliceNet("test_resnet").state_dict())  # the plain module's keys
    with pytest.raises(ConfigError, match="train.compile"):
        from_dict({"train": {"compile": "sometimes"}})


def test_one_persistent_loader_per_fold_trains_each_epoch_at_its_size(prepared, tmp_path, monkeypatch):
    """train_fold builds one DataLoader per fold, its workers persistent; progressive
    resizing still trains each epoch at its size, and the network gets exactly the batches of a
    DataLoader built for that epoch with the worker_init_fn seeding (the code before). Recorded
    where the network sees them, so nothing between the loader and the model may draw from the
    epoch's stream either (tqdm.auto started a second pass of every loader, see one_pass)."""
    from torch.utils.data import DataLoader

    from models import net, trainer
    from models.augment import seed_augment_workers
    from models.runtime import setup
    cfg = load_experiment(write_config(tmp_path, "pers", input={"size": 64, "progressive": [[32, 1], [64, 2]]},
                                       augment={"hflip": 0.5, "shift_scale_rotate": 1.0},
                                       train={"epochs": 3, "num_workers": 2, "batch_size": 32}))
    clean = prepared / "clean" / "train"
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    train, valid = slices[slices["fold"] != 0].iloc[:100], slices[slices["fold"] == 0].iloc[:20]
    data = trainer.FoldData(train=train, valid=valid, clean_dir=clean)
    loaders, seen = [], []
    real_epoch, real_forward = trainer.run_epoch, net.SliceNet.forward

    def epoch(model, loader, *args, **kwargs):
        loaders.append(loader)
        seen.append([])
        return real_epoch(model, loader, *args, **kwargs)

    def forward(self, x, *args, **kwargs):
        if self.training:
            seen[-1].append(x.clone())
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", epoch)
    monkeypatch.setattr(net.SliceNet, "forward", forward)
    (tmp_path / "m").mkdir()
    trainer.train_fold(cfg, 0, data, tmp_path / "m", setup("none", False), resume=False, progress=False,
                       log=lambda *a: None)
    assert len(loaders) == 3 and all(loader is loaders[0] for loader in loaders), "a new DataLoader per epoch"
    assert loaders[0].persistent_workers and loaders[0].num_workers == 2
    assert [{tuple(x.shape[-2:]) for x in batches} for batches in seen] == [{(32, 32)}, {(64, 64)}, {(64, 64)}]

    y_any = data.train["any"].to_numpy(np.float32)
    for e, batches in enumerate(seen):
        dataset = trainer.make_dataset(cfg, data.train, clean, cfg.size_at(e), train=True)
        sampler = EpochSampler(y_any, seed=cfg.train.seed)
        sampler.set_epoch(e)
        before = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2,
                            worker_init_fn=seed_augment_workers(dataset, cfg.train.seed, 0, e))
        expected = [x for x, _, _ in before]
        assert len(expected) == len(batches)
        assert all(torch.equal(x, x0) for x, x0 in zip(batches, expected)), f"epoch {e}"
