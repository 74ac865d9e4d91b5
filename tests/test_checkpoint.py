"""The checkpoint format has one owner (models.checkpoint): a 0-byte, truncated or foreign fold{k}.pt is the
same one-line error from every reader and every entry point (predict.py, predict.py --study, serve.py's
start-up), never torch's traceback; the provenance record is read through it too."""
import shutil

import pytest
import torch

from conftest import REPO, run_script, write_paths


def damage(path, kind: str, good) -> None:
    """Replace `path` (a link to the good checkpoint `good`) by a 0-byte, truncated or foreign file."""
    data = good.read_bytes()
    path.unlink(missing_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # someone else's .pt: loads with weights_only, but is no fold checkpoint of train.py
        torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign"])
def test_every_reader_gives_one_line(trained, tmp_path, kind):
    from models.checkpoint import CheckpointError, load_fold_model, read, read_provenance
    from models.runtime import Runtime
    good = trained[2] / "models" / "tiny" / "fold0.pt"
    path = tmp_path / "fold0.pt"
    damage(path, kind, good)
    errors = []
    for reader in (read, read_provenance, lambda p: load_fold_model(p, Runtime(device=torch.device("cpu")))):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        errors.append(str(err.value))
    assert len(set(errors)) == 1 and "\n" not in errors[0] and str(path) in errors[0]
    assert "train.py --folds 0 --force" in errors[0]
    assert read_provenance(good)["cache_files_digest"]  # a good one still reads, memory-mapped


@pytest.fixture(scope="module")
def broken_tree(prepared, study_models, tmp_path_factory):
    """study_models' model tree (fold models, saved stage two) with fold0.pt replaced per test."""
    _, cfg, src = study_models
    root = tmp_path_factory.mktemp("broken")
    (root / "models" / "tiny").mkdir(parents=True)
    for path in (src / "models" / "tiny").iterdir():
        if path.name.startswith("fold"):
            (root / "models" / "tiny" / path.name).symlink_to(path.resolve())
    (root / "models" / "stacking").symlink_to((src / "models" / "stacking").resolve())
    settings = write_paths(root / "settings.json", raw=prepared / "raw", train=prepared / "clean" / "train",
                           test=prepared / "clean" / "test", root=root)
    return settings, cfg, root, (src / "models" / "tiny" / "fold0.pt").resolve()


def expected_line(path) -> str:
    from models.checkpoint import CheckpointError, read
    with pytest.raises(CheckpointError) as err:
        read(path)
    return f"error: {err.value}"


@pytest.mark.parametrize("entry, kind", [("predict", "empty"), ("study", "truncated"), ("serve", "foreign")])
def test_entry_points_say_it_in_the_same_line(broken_tree, prepared, entry, kind):
    """The regression: a 0-byte fold0.pt then predict.py --force gave torch's traceback (the provenance
    check read the checkpoint outside the guarded reader)."""
    settings, cfg, root, good = broken_tree
    ckpt = root / "models" / "tiny" / "fold0.pt"
    damage(ckpt, kind, good)
    if entry == "predict":
        out = run_script("predict.py", "--settings", settings, "--config", cfg, "--force")
    elif entry == "study":
        out = run_script("predict.py", "--settings", settings, "--config", cfg, "--study",
                         prepared / "raw" / "stage_2_test", "--out", root / "study_out")
    else:  # serve.py exits at start-up, before it binds
        import subprocess
        import sys
        out = subprocess.run([sys.executable, str(REPO / "serve.py"), "--settings", str(settings), "--config",
                              str(cfg), "--port", "1", "--work-dir", str(root / "work")],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == expected_line(ckpt)
    shutil.rmtree(root / "study_out", ignore_errors=True)
