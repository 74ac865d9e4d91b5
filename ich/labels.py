"""The six targets, and reading Kaggle's long-format label csv into a wide table.

`stage_2_train.csv` has one row per (image, label): ``ID_<hex>_<label>,<0|1>``.
The real file repeats some rows; identical repeats are harmless and dropped.
Anything that would silently corrupt training (a value that is not 0/1, two
different values for one pair, an image missing some of its six labels, an
unknown label name) is an error naming the csv line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LABELS = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
SUBTYPES = LABELS[:5]


class LabelsError(ValueError):
    """The label csv cannot be trusted; the message names the offending line."""


def read_labels(path) -> pd.DataFrame:
    """Long csv (a path, or an open file such as a zip member's: messages use its `name`) -> DataFrame
    indexed by image_id with six int8 columns (LABELS order)."""
    source = Path(path) if isinstance(path, str) else path
    path = getattr(source, "name", source) if not isinstance(source, Path) else source
    try:
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read label csv: {exc}") from exc
    if list(df.columns[:2]) != ["ID", "Label"]:
        raise LabelsError(f"{path}: expected columns ID,Label, found {list(df.columns)}")
    line = pd.Series(np.arange(len(df)) + 2, index=df.index)  # header is line 1

    ids = df["ID"].str.strip()
    split = ids.str.rsplit("_", n=1, expand=True)
    if split.shape[1] != 2:
        raise LabelsError(f"{path}: no ID has the form ID_<hex>_<label>")
    image_id, label = split[0], split[1]
    bad = ~label.isin(LABELS) | ~image_id.str.startswith("ID_", na=False)
    if bad.any():
        i = bad.idxmax()
        raise LabelsError(f"{path}, line {line[i]}: ID {df['ID'][i]!r} is not ID_<hex>_<one of {', '.join(LABELS)}>")
    value = df["Label"].str.strip()
    bad = ~value.isin(["0", "1"])
    if bad.any():
        i = bad.idxmax()
        raise LabelsError(f"{path}, line {line[i]}: Label {df['Label'][i]!r} for {df['ID'][i]} is not 0 or 1")

    long = pd.DataFrame({"image_id": image_id, "label": label, "value": value.astype(np.int8), "line": line})
    long = long.drop_duplicates(subset=["image_id", "label", "value"])
    clash = long.duplicated(subset=["image_id", "label"], keep=False)
    if clash.any():
        rows = long[clash].sort_values("line")
        first = rows.iloc[0]
        raise LabelsError(
            f"{path}, line {rows['line'].iloc[1]}: {first.image_id}_{first.label} has both 0 and 1 "
            f"(lines {', '.join(map(str, rows[(rows.image_id == first.image_id) & (rows.label == first.label)].line))})"
        )
    wide = long.pivot(index="image_id", columns="label", values="value")
    wide = wide.reindex(columns=list(LABELS))
    missing = wide.isna().any(axis=1)
    if missing.any():
        img = missing.idxmax()
        lacking = [c for c in LABELS if pd.isna(wide.loc[img, c])]
        first_line = long.loc[long.image_id == img, "line"].min()
        raise LabelsError(f"{path}, line {first_line}: image {img} has no row for {', '.join(lacking)}")
    wide = wide.astype(np.int8)
    wide.columns.name = None
    return wide


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide table (index image_id, LABELS columns) -> Kaggle's long ID,Label frame."""
    values = wide[list(LABELS)]
    ids = np.char.add(np.repeat(values.index.to_numpy().astype(str), len(LABELS)),
                      np.tile(np.array(["_" + c for c in LABELS]), len(values)))
    return pd.DataFrame({"ID": ids, "Label": values.to_numpy().reshape(-1)})
