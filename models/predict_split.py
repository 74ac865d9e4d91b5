"""What stage one on a test split checks before it runs: fold models there, caches that match.

The loop itself is the in-memory engine's (pipeline.engine), whatever the
test images' source (a test cache or the test DICOMs), and contract 2's
test files are written by their owner, ich.stage_one. The checks live here,
beside stage one, because everything they compare comes from the
checkpoints (models.checkpoint): the experiment config, the train cache's
image settings, the reproducibility record.
"""
from __future__ import annotations

from pathlib import Path

from ich.cache import image_settings, read_meta
from ich.stage_one import fold_checkpoints

from .checkpoint import read_provenance


class InferenceError(RuntimeError):
    """Stage-one test inference cannot run; the message says what is missing."""


def check_same_cache(train_dir: Path, test_dir: Path) -> None:
    """The test images must be cached like the train images the models learned from."""
    train, test = read_meta(train_dir), read_meta(test_dir)
    if train is None or test is None:
        raise InferenceError(f"no cache_meta.json in {train_dir if train is None else test_dir}: run prepare_data.py")
    _compare(image_settings(train), test, f"the train cache ({train_dir})", test_dir)


def check_cache(trained: dict, test_dir: Path) -> None:
    """A test cache read by fold models trained on images with `trained` settings (their checkpoints')."""
    test = read_meta(test_dir)
    if test is None:
        raise InferenceError(f"no cache_meta.json in {test_dir}: run prepare_data.py --split test")
    _compare(trained, test, "the cache the fold models were trained on", test_dir)


def _compare(trained: dict, test_meta: dict, what: str, test_dir: Path) -> None:
    test = image_settings(test_meta)
    differ = [k for k in trained if trained[k] != test[k]]
    if differ:
        raise InferenceError(f"test cache ({test_dir}) was prepared with other {', '.join(differ)} than {what}: "
                             "rerun prepare_data.py --split test --force with the config the train cache used")


def training_records(model_dir: Path, experiments, train_dir: Path) -> dict[str, list[dict]]:
    """{experiment: the distinct reproducibility records of its fold checkpoints (ich.provenance), their
    creation times left out}.

    Raises InferenceError when the experiments were trained from caches of
    different file lists, or from another train cache than `train_dir`:
    stage two joins their OOF rows slice by slice, and one submission must
    come from one data set. (Caches that differ in image settings are caught
    against the test cache, check_same_cache and check_cache.) Checkpoints
    from before the record existed carry none and are not compared.
    """
    records, digests = {}, {}
    for exp in experiments:
        found = []
        for path in fold_checkpoints(Path(model_dir) / exp).values():
            rec = read_provenance(path)
            if rec is None:
                continue
            rec = {k: v for k, v in rec.items() if k != "created"}  # the fold models of one run: one record
            digests.setdefault(rec.get("cache_files_digest"), set()).add(exp)
            if rec not in found:
                found.append(rec)
        records[exp] = found
    current = (read_meta(train_dir) or {}).get("files_digest")
    if len(digests) > 1 or (digests and current not in digests):
        seen = "; ".join(f"{', '.join(sorted(e))} from a cache with file-list digest {str(d)[:12]}"
                         for d, e in digests.items())
        raise InferenceError(f"the experiments were trained from different caches ({seen}); the train cache "
                             f"{train_dir} has file-list digest {str(current)[:12]}: retrain them on one cache")
    return records


def require_fold_checkpoints(exp_dir: Path) -> dict[int, Path]:
    """fold_checkpoints(exp_dir), which must not be empty: else an InferenceError saying to train first.

    The one place that says so: test inference, a study and the web
    viewer's models all need an experiment's fold models.
    """
    exp_dir = Path(exp_dir)
    checkpoints = fold_checkpoints(exp_dir)
    if not checkpoints:
        raise InferenceError(f"no fold checkpoints in {exp_dir}: run train.py for {exp_dir.name} first")
    return checkpoints
