"""The 9-channel input (every window of slices i-1, i, i+1), from dataset to test inference."""
import numpy as np
import pandas as pd
import torch

from conftest import write_config


def test_adjacent_windows_dataset_stacks_every_window_of_the_neighbors(prepared):
    from models.data import SliceDataset, input_channels, with_neighbors
    clean = prepared / "clean" / "train"
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    images = np.load(clean / "images.npy", mmap_mode="r")
    s = slices[slices.n_slices >= 3].sort_values(["series_id", "slice_index"])
    s = s[s.series_id == s.series_id.iloc[0]]
    i = int(np.flatnonzero(slices.image_id.to_numpy() == s.image_id.iloc[1])[0])
    img = SliceDataset(slices, clean, mode="adjacent_windows", size=64).image(i)
    assert img.shape == (64, 64, 9) and input_channels("adjacent_windows", 3) == 9
    for j, row in enumerate(s.cache_row.iloc[:3]):
        np.testing.assert_array_equal(img[..., 3 * j:3 * j + 3], images[row])
    x, _, _ = SliceDataset(slices, clean, mode="adjacent_windows", size=32)[i]
    assert x.shape == (9, 32, 32)


def test_adjacent_windows_trains_and_predicts(prepared, tmp_path):
    from models import experiment
    from models.config import load_experiment
    from models.checkpoint import load_fold_model
    from models.runtime import setup
    cfg = load_experiment(write_config(tmp_path, "nine", input={"mode": "adjacent_windows", "size": 32},
                                       train={"epochs": 1}))
    rt = setup("none", False)
    experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                              logs_dir=tmp_path / "l", runtime=rt, folds=[0], progress=False, log=lambda *a: None)
    model, loaded, info = load_fold_model(tmp_path / "m" / "nine" / "fold0.pt", rt)
    assert info["in_chans"] == 9 and loaded.input.mode == "adjacent_windows"
    assert model.mean.shape == (1, 9, 1, 1)
    assert model(torch.zeros(2, 9, 32, 32, dtype=torch.uint8)).shape == (2, 6)
    oof = pd.read_parquet(tmp_path / "m" / "nine" / "fold0.oof.parquet")
    assert len(oof) > 0 and oof.drop(columns="image_id").notna().all().all()
