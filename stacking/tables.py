"""Stage two's log-loss table: its rows, their note, the printed form, and prediction frames."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ich.labels import LABELS

STAGE_TWO = "stage two"
STAGE_TWO_OPTIMISTIC = "stage two (rounds picked on the scored fold, optimistic)"
TABLE_NOTE = ("Stage-two rows are honest out-of-fold scores: each fold scored by models whose number of rounds "
              "(LightGBM) or epochs (sequence) was picked on the other folds, and, with two members, "
              f"'{STAGE_TWO}' is their per-label blend with weights fitted on the other folds too. Rows marked "
              "'optimistic' are the same models stopped where the scored fold itself is best, for comparison only.")


def member_rows(members: dict, oof_blend: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics table's stage-two rows (TABLE_NOTE): one member alone keeps the historic row names."""
    picked = {"lightgbm": "rounds", "sequence": "epochs"}
    if len(members) == 1:
        (name, m), = members.items()
        return {STAGE_TWO: m.oof, f"stage two ({picked[name]} picked on the scored fold, optimistic)":
                m.oof_optimistic}
    rows = {}
    for name, m in members.items():
        rows[f"stage two: {name}"] = m.oof
        rows[f"stage two: {name} ({picked[name]} picked on the scored fold, optimistic)"] = m.oof_optimistic
    rows[STAGE_TWO] = oof_blend
    return rows


def frame(slices: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs, columns=list(LABELS))
    out.insert(0, "image_id", slices["image_id"].to_numpy())
    return out


def format_table(table: pd.DataFrame) -> str:
    width = max(22, *(len(name) + 1 for name in table.index))
    short = {"epidural": "epidural", "intraparenchymal": "intraparen", "intraventricular": "intravent",
             "subarachnoid": "subarach", "subdural": "subdural", "any": "any", "weighted": "WEIGHTED"}
    head = " " * width + "".join(f"{short[c]:>11s}" for c in table.columns)
    lines = [head]
    for name, row in table.iterrows():
        lines.append(f"{name:{width}s}" + "".join(f"{v:11.4f}" for v in row.to_numpy()))
    return "\n".join(lines)


def curves_table(valid: np.ndarray, train: np.ndarray | None) -> pd.DataFrame:
    """The sequence members' curves, one row per (fold, epoch): the validation loss on the member's own
    fold (what picks epochs, stacking.sequence) and its mean training loss over the epoch."""
    k, n = valid.shape
    out = pd.DataFrame({"fold": np.repeat(np.arange(k), n), "epoch": np.tile(np.arange(1, n + 1), k),
                        "valid_loss": valid.ravel()})
    if train is not None:
        out["train_loss"] = train.ravel()
    return out
