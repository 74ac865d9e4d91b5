"""A read-only output folder is found before any work, and named in one line.

Before, each entry point found it at its first (predict.py: its last) write,
as a PermissionError traceback. Now ich.settings.require_writable checks
every folder an entry point writes, up front, by really creating a file.

How the tests make a folder that is not writable: chmod 0o555 stops a normal
user but not root, and these tests may run as root (they do in the project's
containers). So for root the folder is also made immutable (`chattr +i`,
which refuses root too); the fixture checks by writing that the folder
really refuses, and skips that case where neither works (a file system
without immutable flags). The second case, an existing *file* where a folder
is expected, fails for every user everywhere, so it always runs (the helper
and predict.py are tested with both).
"""
import json
import os
import shutil
import subprocess

import pytest

from conftest import SETTINGS_TEMPLATE, TINY, run_script
from ich.settings import SettingsError, require_writable


def refuses_writes(folder) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


@pytest.fixture
def readonly(tmp_path):
    """A folder that refuses writes: chmod 0o555, plus chattr +i where we are root."""
    path = tmp_path / "readonly"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if not refuses_writes(path) and shutil.which("chattr"):  # root: permission bits do not stop it
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if not refuses_writes(path):
            pytest.skip("cannot make a folder that refuses this user (root without chattr +i here)")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.fixture
def file_in_the_way(tmp_path):
    """An existing file where a folder is expected: no user can write into it."""
    path = tmp_path / "blocked"
    path.write_text("not a folder")
    return path


@pytest.fixture(params=["readonly", "file_in_the_way"])
def blocked(request):
    return request.getfixturevalue(request.param)


def settings_with(tmp_path, **keys):
    data = {**SETTINGS_TEMPLATE, **{k: str(v) for k, v in keys.items()}}
    (tmp_path / "raw").mkdir(exist_ok=True)
    (tmp_path / "s.json").write_text(json.dumps(data))
    return tmp_path / "s.json"


def assert_one_line_error(out, *needles):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- the helper --------------------------------------------------------------------------------

def test_require_writable_creates_missing_folders_and_leaves_no_probe(tmp_path):
    require_writable({"LOGS_DIR": tmp_path / "a" / "b", "SUBMISSION_DIR": tmp_path})
    assert (tmp_path / "a" / "b").is_dir()
    assert os.listdir(tmp_path / "a" / "b") == [] and sorted(os.listdir(tmp_path)) == ["a"]


def test_require_writable_names_the_folder_that_is_not(tmp_path, blocked):
    with pytest.raises(SettingsError, match=f"SUBMISSION_DIR points to {blocked}, which is not a writable folder"):
        require_writable({"LOGS_DIR": tmp_path / "logs", "SUBMISSION_DIR": blocked})
    with pytest.raises(SettingsError, match="LOGS_DIR points to .*, which is not a writable folder"):
        require_writable({"LOGS_DIR": blocked / "logs"})  # a missing folder that cannot be created


# --- every entry point, before any work ---------------------------------------------------------

def test_prepare_checks_its_clean_dir(tmp_path, readonly):
    settings = settings_with(tmp_path, TEST_DATA_CLEAN_PATH=readonly)
    out = run_script("prepare_data.py", "--settings", settings, "--split", "test")
    assert_one_line_error(out, f"TEST_DATA_CLEAN_PATH points to {readonly}")


def test_train_checks_models_and_logs_before_config_json(tmp_path, readonly):
    (tmp_path / "tiny.yaml").write_text(json.dumps(TINY))  # JSON is YAML
    settings = settings_with(tmp_path, LOGS_DIR=readonly)
    out = run_script("train.py", "--settings", settings, "--config", tmp_path / "tiny.yaml")
    assert_one_line_error(out, f"LOGS_DIR points to {readonly}")
    assert not (tmp_path / "models" / "tiny").exists()


def test_predict_checks_the_submission_dir_before_stage_one(tmp_path, blocked):
    """Before: predict.py ran stage one and stage two and failed at the submission's write.

    Here the inputs are missing too (an empty RAW_DATA_DIR): the error names
    SUBMISSION_DIR, so the check came before predict.py read anything.
    """
    (tmp_path / "p.yaml").write_text("experiments: [tiny]\n")
    settings = settings_with(tmp_path, SUBMISSION_DIR=blocked)
    out = run_script("predict.py", "--settings", settings, "--config", tmp_path / "p.yaml")
    assert_one_line_error(out, f"SUBMISSION_DIR points to {blocked}")


def test_report_checks_the_out_folder(tmp_path, readonly):
    (tmp_path / "p.yaml").write_text("experiments: [tiny]\n")
    settings = settings_with(tmp_path)
    out = run_script("report.py", "--settings", settings, "--config", tmp_path / "p.yaml",
                     "--out", readonly / "report.html")
    assert_one_line_error(out, f"--out points to {readonly}")
