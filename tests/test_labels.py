import pandas as pd
import pytest

from ich.labels import LABELS, LabelsError, read_labels, to_long


def write(tmp_path, rows):
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
    return path


def rows_for(image, values):
    return [[f"{image}_{label}", v] for label, v in zip(LABELS, values)]


def test_wide_table_and_duplicates(tmp_path):
    rows = rows_for("ID_aa", [0, 1, 0, 0, 0, 1]) + rows_for("ID_bb", [0] * 6)
    rows += rows[:3]  # the real file repeats rows
    wide = read_labels(write(tmp_path, rows))
    assert list(wide.columns) == list(LABELS)
    assert wide.loc["ID_aa"].tolist() == [0, 1, 0, 0, 0, 1]
    assert len(wide) == 2 and wide.dtypes.eq("int8").all()
    again = to_long(wide)
    assert len(again) == 12 and again["ID"].iloc[0] == "ID_aa_epidural"


@pytest.mark.parametrize("bad, message", [
    ("value", "line 3: Label '2'"),
    ("missing", "ID_bb has no row for any"),
    ("clash", "ID_aa_epidural has both 0 and 1"),
    ("label", "line 2"),
])
def test_errors_name_the_row(tmp_path, bad, message):
    rows = rows_for("ID_aa", [0, 1, 0, 0, 0, 1]) + rows_for("ID_bb", [0] * 6)
    if bad == "value":
        rows[1][1] = 2
    elif bad == "missing":
        rows = rows[:-1]
    elif bad == "clash":
        rows.append(["ID_aa_epidural", 1])
    elif bad == "label":
        rows[0][0] = "ID_aa_bleeding"
    with pytest.raises(LabelsError, match=message):
        read_labels(write(tmp_path, rows))


def test_wrong_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(LabelsError, match="expected columns ID,Label"):
        read_labels(path)
