"""Stage one is the same function at training and at test time.

Each test here fails on a pipeline with the asymmetry it names: test
predictions that differ from out-of-fold ones for the same image, outputs
reused after their checkpoints changed, a kept epoch at a size nothing is
predicted at, facts read from anywhere but the checkpoint, probabilities on
the sampler's prior instead of the real one.
"""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_config
from ich.labels import LABELS

TINY_PREPARE = dict(image_size=64, n_folds=3, n_jobs=2)


def cpu():
    from models.runtime import setup
    return setup("none", False)


def copy_experiment(src, dst):
    """A model folder whose checkpoints and OOF files link to src's (stage one on test fits stage two's PCA
    on the OOF embeddings first): stage one on test writes its outputs into dst only."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.endswith(".last.pt") and not path.name.startswith("test"):
            (dst / path.name).symlink_to(path)
    return dst


def on_test(exp, test_dir, train_dir, logs: list, *, force: bool = False):
    """predict.py's stage one on a test split (pipeline.batch.stage_one_test): the test cache in test_dir,
    experiment folder exp, batches of 7."""
    from conftest import write_paths, write_predict_config
    from ich.settings import load_settings
    from pipeline.batch import stage_one_test
    from stacking.config import load_predict_config
    root = exp.parent.parent
    settings = load_settings(write_paths(root / "settings.json", raw=root / "raw", train=train_dir,
                                         test=test_dir, root=root))
    cfg = load_predict_config(write_predict_config(root / "predict.yaml", experiments=[exp.name], batch_size=7))
    return stage_one_test(cfg, settings, cpu(), force=force, progress=False, log=logs.append)


def prepare_as_test(prepared, image_ids, root):
    """The given train images, as a Kaggle test split, prepared with the train cache's settings."""
    from ich.config import PrepareConfig
    from ich.prepare import prepare_split
    folder = root / "raw" / "stage_2_test"
    folder.mkdir(parents=True)
    for image_id in image_ids:
        (folder / f"{image_id}.dcm").symlink_to(prepared / "raw" / "stage_2_train" / f"{image_id}.dcm")
    prepare_split(root / "raw", root / "clean", "test", PrepareConfig(**TINY_PREPARE), progress=False)
    return root / "clean"


@pytest.fixture(scope="module")
def held_out_as_test(prepared, trained, tmp_path_factory):
    """Fold 0's held-out train images prepared as a test split, and the trained fold models on it."""
    _, _, work = trained
    root = tmp_path_factory.mktemp("parity")
    slices = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    ids = slices.loc[slices["fold"] == 0, "image_id"].tolist()
    test_dir = prepare_as_test(prepared, ids, root)
    exp = copy_experiment(work / "models" / "tiny", root / "models" / "tiny")
    logs = []
    on_test(exp, test_dir, prepared / "clean" / "train", logs)
    return exp, test_dir, work / "models" / "tiny", logs


def test_test_path_on_held_out_images_gives_their_oof(held_out_as_test):
    """Item 8: windows, resizing, normalization, TTA and the sampler correction agree on both paths."""
    exp, _, trained_exp, _ = held_out_as_test
    oof = pd.read_parquet(trained_exp / "fold0.oof.parquet").set_index("image_id")
    test = pd.read_parquet(exp / "test_fold0.parquet").set_index("image_id")
    assert len(test) == len(oof) > 20 and set(test.index) == set(oof.index)
    np.testing.assert_allclose(test.loc[oof.index, list(LABELS)].to_numpy(), oof[list(LABELS)].to_numpy(),
                               atol=2e-5, rtol=0)
    # the embeddings, as stage one on test keeps them: their scores through stage two's PCA of fold model 0
    import joblib
    scores = np.load(exp / "test_fold0_pcs.npy")
    pca = joblib.load(exp / "test_pca.joblib")["models"][0]
    oof_scores = pca.transform(np.load(trained_exp / "fold0.oof_emb.npy").astype(np.float32))
    pos = pd.Series(np.arange(len(test)), index=test.index)
    got = scores[pos.loc[oof.index].to_numpy()]
    assert np.abs(got - oof_scores).max() <= 2e-2 * np.abs(oof_scores).max()  # float16 embeddings on both sides
    # the other fold models saw these images in training: their outputs must differ (a real check)
    other = pd.read_parquet(exp / "test_fold1.parquet").set_index("image_id")
    assert np.abs(other.loc[oof.index, list(LABELS)].to_numpy() - oof[list(LABELS)].to_numpy()).max() > 1e-3


def test_one_output_per_fold_model_and_their_mean(held_out_as_test):
    """Contract 2: test outputs per fold model; test.parquet is only their mean."""
    exp, test_dir, _, _ = held_out_as_test
    slices = pd.read_parquet(test_dir / "slices.parquet")
    per_fold = [pd.read_parquet(exp / f"test_fold{k}.parquet") for k in range(3)]
    for table in per_fold:
        assert table["image_id"].tolist() == slices["image_id"].tolist()
    mean = pd.read_parquet(exp / "test.parquet")
    np.testing.assert_allclose(mean[list(LABELS)].to_numpy(),
                               np.mean([t[list(LABELS)].to_numpy() for t in per_fold], axis=0), rtol=1e-6)
    assert not (exp / "test_emb.npy").exists()


def test_test_outputs_are_tied_to_what_made_them(held_out_as_test, prepared):
    """Item 3: a changed checkpoint (retrained, or another TTA) invalidates the reused outputs."""
    exp, test_dir, _, _ = held_out_as_test
    logs = []
    on_test(exp, test_dir, prepared / "clean" / "train", logs)
    assert "reused" in logs[-1]
    before = {k: pd.read_parquet(exp / f"test_fold{k}.parquet") for k in range(3)}

    state = torch.load(exp / "fold1.pt", weights_only=True)
    state["config"]["train"]["tta_hflip"] = False  # e.g. retrained without flip TTA
    (exp / "fold1.pt").unlink()
    torch.save(state, exp / "fold1.pt")
    logs.clear()
    on_test(exp, test_dir, prepared / "clean" / "train", logs)
    assert not any("reused" in line for line in logs)
    after = {k: pd.read_parquet(exp / f"test_fold{k}.parquet") for k in range(3)}
    pd.testing.assert_frame_equal(before[0], after[0], atol=1e-6, check_exact=False)
    assert np.abs(after[1][list(LABELS)].to_numpy() - before[1][list(LABELS)].to_numpy()).max() > 1e-4
    logs.clear()
    on_test(exp, test_dir, prepared / "clean" / "train", logs)
    assert "reused" in logs[-1]


def test_facts_come_from_the_checkpoint(held_out_as_test, prepared, tmp_path):
    """Item 6: normalization and image settings are stored with the weights; a mismatch is an error."""
    from models.checkpoint import CheckpointError, load_fold_model
    from models.predict_split import InferenceError
    exp, test_dir, _, _ = held_out_as_test
    state = torch.load(exp / "fold0.pt", weights_only=True)
    assert {"mean", "std", "neg_keep"} <= set(state["state_dict"]) and state["image_settings"]["image_size"] == 64
    state["state_dict"]["mean"] = state["state_dict"]["mean"] + 7.0
    torch.save(state, tmp_path / "fold0.pt")
    model, _, _ = load_fold_model(tmp_path / "fold0.pt", cpu())
    torch.testing.assert_close(model.mean, state["state_dict"]["mean"])  # not timm's default for the backbone

    state["image_settings"]["image_size"] = 128  # trained on another cache than the test cache
    other = tmp_path / "models" / "other"
    other.mkdir(parents=True)
    torch.save(state, other / "fold0.pt")
    with pytest.raises(InferenceError, match="image_size"):
        on_test(other, test_dir, prepared / "clean" / "train", [])

    old = {k: v for k, v in state["state_dict"].items() if k not in ("mean", "std", "neg_keep")}
    torch.save({**state, "state_dict": old}, other / "fold0.pt")
    with pytest.raises(CheckpointError, match="older version"):
        load_fold_model(other / "fold0.pt", cpu())
    (other / "fold0.pt").write_bytes(b"")  # a damaged file is named, in one line
    with pytest.raises(CheckpointError, match="fold0.pt"):
        load_fold_model(other / "fold0.pt", cpu())


# --- training-side choices ---------------------------------------------------------------------

def test_sampling_correction_recovers_the_real_prior():
    """Item 7, the formula: posteriors learned under negative subsampling, mapped back."""
    from models.net import correct_sampling
    rng = np.random.default_rng(0)
    n = 200_000
    p_any = rng.beta(0.3, 2.0, n)                        # real posteriors of `any`
    share = rng.dirichlet(np.ones(5), n) * 1.5           # subtypes imply `any`
    p = np.column_stack([np.clip(p_any[:, None] * share, 0, p_any[:, None]), p_any])
    q = 0.2                                              # the sampler keeps 20% of negatives
    d = p_any + (1 - p_any) * q                          # what a network sees under that sampling
    p_sampled = p / d[:, None]
    back = correct_sampling(torch.tensor(p_sampled), q).numpy()
    np.testing.assert_allclose(back, p, rtol=1e-9, atol=1e-12)
    assert p_sampled[:, -1].mean() > 1.5 * p_any.mean()  # uncorrected: far off the real prior
    np.testing.assert_array_equal(correct_sampling(torch.tensor(p), 1.0).numpy(), p)


def test_balanced_sampler_predicts_the_real_rate(prepared, tmp_path):
    """Item 7, end to end: trained with a balanced sampler, the mean predicted `any` is the real rate."""
    from models import experiment
    from models.config import load_experiment
    cfg = load_experiment(write_config(tmp_path, "bal", sampler={"kind": "balanced", "neg_ratio": 1.0},
                                       augment={"hflip": 0.0}, train={"epochs": 6, "tta_hflip": False}))
    experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                              logs_dir=tmp_path / "l", runtime=cpu(), folds=[0], progress=False,
                              log=lambda *a: None)
    slices = pd.read_parquet(prepared / "clean" / "train" / "slices.parquet")
    oof = pd.read_parquet(tmp_path / "m" / "bal" / "fold0.oof.parquet")
    held = slices.set_index("image_id").loc[oof["image_id"]]
    state = torch.load(tmp_path / "m" / "bal" / "fold0.pt", weights_only=True)
    q = float(state["state_dict"]["neg_keep"])
    train_any = slices.loc[slices["fold"] != 0, "any"]
    assert q == pytest.approx(train_any.sum() / (len(train_any) - train_any.sum()), rel=0.01)

    real, predicted = held["any"].mean(), oof["any"].mean()
    # what the network says before the correction (inverse of correct_sampling for `any`)
    uncorrected = (oof["any"] / (oof["any"] + (1 - oof["any"]) * q)).mean()
    assert uncorrected > real + 0.15, (uncorrected, real)
    assert abs(predicted - real) < 0.1, (predicted, real)
    assert abs(predicted - real) < abs(uncorrected - real) / 2


def test_only_epochs_at_the_final_size_can_be_kept(prepared, tmp_path, monkeypatch):
    """Item 4: with progressive resizing, `best` never keeps an epoch at an earlier size."""
    from models import experiment, trainer
    from models.config import load_experiment
    cfg = load_experiment(write_config(tmp_path, "prog", input={"size": 64, "progressive": [[32, 1], [64, 1]]},
                                       train={"epochs": 2, "checkpoint": "best", "tta_hflip": False}))
    real_validate = trainer.validate

    def validate(model, dataset, runtime, cfg_, progress, **kwargs):
        probs = real_validate(model, dataset, runtime, cfg_, progress, **kwargs)
        if dataset.size == 32:  # a perfect score at the small size: the old rule kept this epoch
            return np.clip(dataset.labels, 0.001, 0.999)
        return probs

    monkeypatch.setattr(trainer, "validate", validate)
    logs = []
    experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                              logs_dir=tmp_path / "l", runtime=cpu(), folds=[0], progress=False,
                              log=logs.append)
    kept = torch.load(tmp_path / "m" / "prog" / "fold0.pt", weights_only=True)
    assert kept["epoch"] == 2 and kept["selected"] == "best"


def test_best_epoch_oof_is_labelled_and_the_last_epoch_given_beside(prepared, tmp_path, monkeypatch):
    """Item 5 (stage one): a kept epoch chosen on the fold is reported as such, with the last epoch's OOF."""
    from models import experiment, trainer
    from models.config import load_experiment
    cfg = load_experiment(write_config(tmp_path, "best", train={"epochs": 2, "checkpoint": "best",
                                                                "tta_hflip": False}))
    real_validate, calls = trainer.validate, []

    def validate(model, dataset, runtime, cfg_, progress, **kwargs):
        calls.append(1)
        probs = real_validate(model, dataset, runtime, cfg_, progress, **kwargs)
        return np.clip(dataset.labels, 0.001, 0.999) if len(calls) == 1 else probs  # epoch 1 "wins"

    monkeypatch.setattr(trainer, "validate", validate)
    logs = []
    out = experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                                    logs_dir=tmp_path / "l", runtime=cpu(), folds=[0], progress=False,
                                    log=logs.append)
    assert torch.load(tmp_path / "m" / "best" / "fold0.pt", weights_only=True)["epoch"] == 1
    assert any("epoch 1 selected on this fold (optimistic); last epoch" in line for line in logs)
    kept = pd.read_parquet(tmp_path / "m" / "best" / "fold0.oof.parquet")
    last = pd.read_parquet(tmp_path / "m" / "best" / "fold0.oof_last.parquet")
    assert kept["image_id"].tolist() == last["image_id"].tolist()
    assert np.abs(kept[list(LABELS)].to_numpy() - last[list(LABELS)].to_numpy()).max() > 1e-4
    assert out["complete"] is False  # one fold of three


def test_checkpoints_are_written_atomically(prepared, tmp_path, monkeypatch):
    """A kill during torch.save leaves the previous good file, never a truncated one."""
    from models import trainer
    saved = []
    real_save = torch.save

    def dies_while_writing(obj, path, *a, **k):
        saved.append(str(path))
        if len(saved) == 3:  # epoch 2's resume state (after its fold0.pt)
            with open(path, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    from models import experiment
    from models.config import load_experiment
    cfg = load_experiment(write_config(tmp_path, "atomic", train={"epochs": 2}))
    monkeypatch.setattr(trainer.torch, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cfg, clean_dir=prepared / "clean" / "train", model_dir=tmp_path / "m",
                                  logs_dir=tmp_path / "l", runtime=cpu(), folds=[0], progress=False,
                                  log=lambda *a: None)
    monkeypatch.setattr(trainer.torch, "save", real_save)
    folder = tmp_path / "m" / "atomic"
    state = torch.load(folder / "fold0.last.pt", weights_only=True)  # epoch 1's, intact
    assert state["epoch"] == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert json.loads((folder / "config.json").read_text())["train"]["checkpoint"] == "last"


def test_damaged_resume_state_is_named_in_one_line(prepared, tmp_path):
    """A truncated fold{k}.last.pt made --resume raise a traceback."""
    from conftest import run_train, settings_for
    settings = settings_for(prepared, tmp_path)
    cfg = write_config(tmp_path, "broken")
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "fold0.last.pt").write_bytes(b"PK\x03\x04 cut short")
    out = run_train("--settings", settings, "--config", cfg, "--folds", "0", "--resume")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "fold0.last.pt is damaged" in out.stderr and "--force" in out.stderr


def test_submission_has_every_sample_row_for_pydicom_corpus(prepared, trained, tmp_path):
    """pydicom's own test files as a test split: no crash, and a submission with every sample row."""
    import shutil
    from pathlib import Path

    import pydicom

    from conftest import link_models, run_script, write_paths, write_predict_config
    from ich.config import PrepareConfig
    from ich.prepare import prepare_split
    _, _, work = trained
    corpus = Path(pydicom.data.__file__).parent / "test_files"
    split = tmp_path / "raw" / "stage_2_test"
    split.mkdir(parents=True)
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        shutil.copy(path, split / str(path.relative_to(corpus)).replace("/", "__"))
    prepare_split(tmp_path / "raw", tmp_path / "clean", "test", PrepareConfig(**TINY_PREPARE), progress=False)
    slices = pd.read_parquet(tmp_path / "clean" / "slices.parquet")
    rejected = pd.read_csv(tmp_path / "clean" / "rejected.csv", keep_default_na=False)
    ids = sorted(set(slices["image_id"]) | set(rejected["image_id"]) - {""}) + ["ID_nodicom"]
    sample = pd.DataFrame({"ID": [f"{i}_{c}" for i in ids for c in LABELS], "Label": 0.5})
    sample.to_csv(tmp_path / "raw" / "stage_2_sample_submission.csv", index=False)

    link_models(work / "models" / "tiny", tmp_path / "models" / "tiny")  # the test outputs are new
    settings = write_paths(tmp_path / "settings.json", raw=tmp_path / "raw", train=prepared / "clean" / "train",
                           test=tmp_path / "clean", root=tmp_path)
    cfg = write_predict_config(tmp_path / "predict.yaml")
    out = run_script("predict.py", "--settings", settings, "--config", cfg)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "sub" / "submission.csv")
    assert sub["ID"].tolist() == sample["ID"].tolist()
    assert sub["Label"].between(1e-6, 1 - 1e-6).all()
    assert f"{len(ids)} test images: {len(slices)} predicted" in out.stdout
