"""submission.csv: exactly the sample submission's rows, in its order.

Every (image, label) of `stage_2_sample_submission.csv` gets a probability:
- from the predictions when the image has one;
- else, for an image prepare_data rejected but could place (its header was
  readable, so series and z are known), the mean of the predictions of the
  nearest slice before and after it in its series;
- else the prior: each label's frequency in the training data.
Probabilities are clipped (default [1e-6, 1 - 1e-6]: a confident mistake
costs at most 13.8 instead of 34.5) and the file is written atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import write_atomic
from .labels import LABELS, read_labels
from .metric import weighted_log_loss


class SubmissionError(ValueError):
    """The sample submission cannot be used."""


@dataclass
class SubmissionStats:
    n_images: int
    predicted: int
    from_neighbors: int
    from_prior: int

    def line(self) -> str:
        return (f"{self.n_images} test images: {self.predicted} predicted, {self.from_neighbors} from series "
                f"neighbors, {self.from_prior} from the prior")


def read_sample(path) -> pd.DataFrame:
    """Sample submission (a path, or an open file such as a zip member's, None: absent) -> DataFrame(ID,
    image_id, label) in file order."""
    if path is None or (isinstance(path, (str, Path)) and not Path(path).is_file()):
        raise SubmissionError(f"sample submission {path or 'stage_2_sample_submission.csv'} not found")
    source, path = path, getattr(path, "name", path)
    sample = pd.read_csv(source, dtype=str, keep_default_na=False)
    if list(sample.columns[:2]) != ["ID", "Label"]:
        raise SubmissionError(f"{path}: expected columns ID,Label")
    parts = sample["ID"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or not parts[1].isin(LABELS).all():
        raise SubmissionError(f"{path}: IDs must look like ID_<hex>_<label>")
    dup = sample["ID"][sample["ID"].duplicated()]
    if len(dup):  # Kaggle scores each ID once; a repeated row would be scored twice here
        raise SubmissionError(f"{path}: {dup.nunique()} IDs appear more than once (e.g. {dup.iloc[0]}): "
                              "use the competition's stage_2_sample_submission.csv")
    return pd.DataFrame({"ID": sample["ID"], "image_id": parts[0], "label": parts[1]})


def neighbor_fill(missing: pd.DataFrame, placed: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """Mean of the nearest predicted slices before and after each missing one (by z, same series)."""
    known = placed[["image_id", "series_id", "z"]].merge(preds, on="image_id")
    out = {}
    for row in missing.itertuples(index=False):
        series = known[known["series_id"] == row.series_id]
        if series.empty or not np.isfinite(row.z):
            continue
        below = series[series["z"] <= row.z].nlargest(1, "z")
        above = series[series["z"] > row.z].nsmallest(1, "z")
        near = pd.concat([below, above])
        out[row.image_id] = near[list(LABELS)].mean().to_numpy()
    return pd.DataFrame.from_dict(out, orient="index", columns=list(LABELS))


def build_submission(sample: pd.DataFrame, preds: pd.DataFrame, *, prior: np.ndarray,
                     test_slices: pd.DataFrame | None = None, rejected: pd.DataFrame | None = None,
                     clip=(1e-6, 1 - 1e-6)) -> tuple[pd.DataFrame, SubmissionStats]:
    images = pd.Index(sample["image_id"].unique())
    # float64 throughout: predictions may come as float32, and pandas 3 refuses float64 fills into them
    table = preds.drop_duplicates("image_id").set_index("image_id")[list(LABELS)].astype(np.float64).reindex(images)
    have = table.notna().all(axis=1)
    n_pred = int(have.sum())
    n_neigh = 0
    if rejected is not None and test_slices is not None and (~have).any() and "series_id" in rejected:
        lost = rejected[rejected["image_id"].isin(images[~have]) & rejected["series_id"].notna()]
        filled = neighbor_fill(lost, test_slices, preds)
        if len(filled):
            table.loc[filled.index] = filled.to_numpy()
            n_neigh = len(filled)
    still = table.isna().any(axis=1)
    table.loc[still] = np.tile(np.asarray(prior, dtype=np.float64), (int(still.sum()), 1))
    values = table.to_numpy(np.float64)
    col = pd.Index(list(LABELS)).get_indexer(sample["label"])
    row = images.get_indexer(sample["image_id"])
    probs = np.clip(values[row, col], clip[0], clip[1])
    sub = pd.DataFrame({"ID": sample["ID"].to_numpy(), "Label": probs})
    return sub, SubmissionStats(len(images), n_pred, n_neigh, int(still.sum()))


def write_submission(sub: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: sub.to_csv(p, index=False, float_format="%.6g"))
    return path


def score_submission(sub: pd.DataFrame, labels_csv) -> float | None:
    """Competition score of a submission when the test labels are known (the demo: a path or an open
    file; None or no such file: absent), else None."""
    if labels_csv is None or (isinstance(labels_csv, (str, Path)) and not Path(labels_csv).is_file()):
        return None
    truth = read_labels(labels_csv)
    wide = sub.assign(image_id=sub["ID"].str.rsplit("_", n=1).str[0], label=sub["ID"].str.rsplit("_", n=1).str[1])
    wide = wide.pivot(index="image_id", columns="label", values="Label")[list(LABELS)]
    common = wide.index.intersection(truth.index)
    if len(common) == 0:
        return None
    return weighted_log_loss(truth.loc[common].to_numpy(), wide.loc[common].to_numpy())
