"""Every config kind is type-checked on load, by one routine, with one error style.

Each bad value below gave a traceback (or was silently misread) before: the
check must now stop the run at load time with
`<file>: <section.key> must be <type>, got <value>` (or a range message),
printed by the entry scripts as one line, before any output is written.
"""
import json

import pandas as pd
import pytest
import yaml

from conftest import SETTINGS_TEMPLATE, TINY, run_script
from ich.config import ConfigError, load_prepare_config
from ich.labels import LABELS
from models.config import from_dict
from stacking.config import load_predict_config


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(out, *needles):
    """An entry script's user error: exit 2, exactly one line on stderr, no traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- predict configs (stacking/config.py) -----------------------------------------------------

PREDICT_OK = {"experiments": ["demo_cpu"]}


@pytest.mark.parametrize("key, value, message", [
    ("k_neighbors", "5", "k_neighbors must be int, got '5' (text, not a number"),  # before: TypeError in '<'
    ("clip", 0.5, "clip must be list, got 0.5"),                                   # before: float not iterable
    ("clip", [0.1], "clip must be a list of two numbers"),                         # before: ValueError unpacking
    ("lgb", 5, "lgb must be mapping, got 5"),                                      # before: accepted, crashed later
    ("batch_size", "64", "batch_size must be int, got '64'"),                      # before: accepted, crashed later
    ("batch_size", 0, "batch_size must be >= 1"),                                  # before: accepted
    ("num_workers", -1, "num_workers must be >= 0"),                               # before: accepted
    ("experiments", "demo_cpu", "experiments must be list, got 'demo_cpu'"),       # before: read as d, e, m, o, ...
    ("experiments", [], "experiments must list at least one"),
    ("start_from_stage_one", "yes", "start_from_stage_one must be bool"),          # before: accepted
    ("name", None, "name must be str, got null"),
])
def test_predict_config_bad_values(tmp_path, key, value, message):
    path = write_yaml(tmp_path / "p.yaml", {**PREDICT_OK, key: value})
    with pytest.raises(ConfigError) as err:
        load_predict_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_predict_config_unknown_key_names_the_known_ones(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {**PREDICT_OK, "k_neigbours": 3})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) k_neigbours; known: name, experiments, k_neighbors"):
        load_predict_config(path)


def test_predict_script_reports_a_bad_config_in_one_line(tmp_path):
    """experiments: demo_cpu (a string) used to be read one character at a time."""
    (tmp_path / "s.json").write_text(json.dumps(SETTINGS_TEMPLATE))
    config = write_yaml(tmp_path / "p.yaml", {"experiments": "demo_cpu"})
    out = run_script("predict.py", "--settings", tmp_path / "s.json", "--config", config)
    assert_one_line_error(out, f"{config}: experiments must be list, got 'demo_cpu'")


def test_report_script_reports_a_bad_config_in_one_line(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SETTINGS_TEMPLATE))
    config = write_yaml(tmp_path / "p.yaml", {**PREDICT_OK, "clip": 0.5})
    out = run_script("report.py", "--settings", tmp_path / "s.json", "--config", config)
    assert_one_line_error(out, f"{config}: clip must be list, got 0.5")


# --- prepare configs (ich/config.py) ----------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("n_jobs", 0, "n_jobs must be a number of worker processes >= 1"),  # before: accepted, then joblib failed
    ("image_size", "256", "image_size must be int, got '256'"),
    ("image_size", 8, "image_size must be >= 16"),
    ("sigmoid", "yes", "sigmoid must be bool, got 'yes'"),
    ("windows", {"name": "brain"}, "windows must be list"),
    ("windows", [], "windows must be non-empty"),
    ("chunk_size", True, "chunk_size must be int, got True"),
])
def test_prepare_config_bad_values(tmp_path, key, value, message):
    path = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError) as err:
        load_prepare_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_prepare_config_keeps_accepting_other_negative_n_jobs(tmp_path):
    """joblib's convention (-2 = all cores but one) was accepted before and works; only 0 is meaningless."""
    assert load_prepare_config(write_yaml(tmp_path / "c.yaml", {"n_jobs": -2})).n_jobs == -2


def test_prepare_script_reports_a_bad_config_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "s.json").write_text(json.dumps(SETTINGS_TEMPLATE))
    config = write_yaml(tmp_path / "c.yaml", {"n_jobs": 0})
    out = run_script("prepare_data.py", "--settings", tmp_path / "s.json", "--config", config)
    assert_one_line_error(out, f"{config}: n_jobs must be")
    assert not (tmp_path / "clean").exists()


def test_unreadable_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image_size: [1,\nn_jobs: 2\n")
    with pytest.raises(ConfigError, match=r"not readable YAML: line \d+, column \d+: ") as err:
        load_prepare_config(path)
    assert "\n" not in str(err.value)


# --- experiment configs (models/config.py) ----------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"model": {"backbone": "resnet_does_not_exist"}}, "model.backbone 'resnet_does_not_exist' is not a timm model"),
    ({"model": {"backbone": "resnet19"}}, "did you mean"),
    ({"train": {"batch_size": "64"}}, "train.batch_size must be int, got '64'"),
    ({"train": {"num_workers": -1}}, "train.num_workers must be >= 0"),
    ({"optim": {"lr": "1e-3"}}, "optim.lr must be float, got '1e-3' (text, not a number"),
    ({"optim": {"name": "lamb"}}, "optim.name must be one of adamw, adam, sgd, got 'lamb'"),  # models.optim
    ({"model": {"dropout": 1.5}}, "model.dropout must be in [0, 1)"),
    ({"model": {"pretrained": 5}}, "model.pretrained must be str or null, got 5"),
    ({"train": 3}, "train must be a mapping"),
    ({"augment": {"erasing_on": "positives"}}, "augment.erasing_on must be negatives or all, got 'positives'"),
    ({"train": {"epoch": 3, "batchsize": 2}}, "unknown key(s) train.epoch, train.batchsize; known: train.epochs"),
])
def test_experiment_config_bad_values(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data, where="e.yaml")
    assert str(err.value).startswith("e.yaml: ") and message in str(err.value)


def test_unknown_backbone_stops_train_before_config_json(tmp_path):
    """Before: train.py wrote MODEL_CHECKPOINT_DIR/<exp>/config.json, then SliceNet raised (a traceback)."""
    clean = tmp_path / "clean" / "train"
    clean.mkdir(parents=True)
    n = 4  # a train table that load_train_table accepts, so nothing but the backbone can stop the run
    slices = pd.DataFrame({"image_id": [f"ID_{i}" for i in range(n)], "series_id": "s", "slice_index": range(n),
                           "cache_row": range(n), "fold": [0, 0, 1, 1]})
    for label in LABELS:
        slices[label] = 0
    slices.to_parquet(clean / "slices.parquet")
    (tmp_path / "s.json").write_text(json.dumps(SETTINGS_TEMPLATE))
    config = write_yaml(tmp_path / "bad.yaml", {**TINY, "model": {"backbone": "resnet_does_not_exist"}})
    out = run_script("train.py", "--settings", tmp_path / "s.json", "--config", config)
    assert_one_line_error(out, f"{config}: model.backbone 'resnet_does_not_exist' is not a timm model")
    assert not (tmp_path / "models" / "bad" / "config.json").exists()
    assert not (tmp_path / "models" / "bad").exists()


def test_train_folds_option_is_checked_by_argparse(tmp_path):
    """Before: --folds a gave a ValueError traceback from int()."""
    out = run_script("train.py", "--config", tmp_path / "any.yaml", "--folds", "0,a")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "expected comma-separated fold numbers such as 0,2, got '0,a'" in out.stderr


def test_the_shipped_recipe_follows_the_published_solutions():
    """The default stack (configs/predict/default.yaml): every experiment loads, trains most of its steps at
    512 px from the head-cropped 512-px cache, averages its last two epochs and freezes no epoch; the
    third model is a ResNeXt101 at 512 px."""
    from ich.config import load_prepare_config
    from models.config import load_experiment
    from stacking.config import load_predict_config
    assert load_prepare_config("configs/prepare/512.yaml").crop_border is True
    exps = {e: load_experiment(f"configs/{e}.yaml") for e in load_predict_config("configs/predict/default.yaml").experiments}
    assert len(exps) == 3 and "resnext101_32x4d" in {c.model.backbone for c in exps.values()}
    for name, cfg in exps.items():
        sizes = [cfg.size_at(e) for e in range(cfg.train.epochs)]
        assert cfg.final_size == 512 and sizes.count(512) > len(sizes) / 2, (name, sizes)
        assert cfg.train.average_last == 2 and cfg.train.freeze_epochs == 0 and cfg.train.tta_hflip, name


# --- the DICOM node's config (node/config.py) ----------------------------------------------------

def test_the_shipped_node_config_loads():
    from node.config import load_node_config
    from conftest import REPO
    cfg = load_node_config(REPO / "configs" / "node" / "orthanc.yaml")
    assert cfg.allows("ORTHANC", "127.0.0.1") and not cfg.allows("ORTHANC", "10.0.0.9")
    assert not cfg.allows("STRANGER", "127.0.0.1") and cfg.quiet_seconds == 5


@pytest.mark.parametrize("change, message", [
    ({"quiet_seconds": "5"}, "quiet_seconds must be float, got '5'"),
    ({"callers": []}, "callers is empty"),
    ({"callers": [{"ae_title": "X", "port": 1}]}, "unknown key(s) callers[0].port"),
    ({"destinations": [], "stow_url": None}, "say where the SR goes"),
    ({"destinations": [{"ae_title": "PACS", "host": "h", "port": "104"}]}, "destinations[0].port must be int"),
    ({"ae_title": "A_TITLE_LONGER_THAN_16"}, "1 to 16 characters"),
    ({"max_wait_seconds": 1}, "max_wait_seconds must be >= quiet_seconds"),
    ({"quiet": 5}, "unknown key(s) quiet"),
])
def test_node_config_bad_values(tmp_path, change, message):
    from node.config import load_node_config
    from conftest import REPO
    data = {**yaml.safe_load((REPO / "configs" / "node" / "orthanc.yaml").read_text()), **change}
    with pytest.raises(ConfigError) as err:
        load_node_config(write_yaml(tmp_path / "node.yaml", data))
    assert message in str(err.value)


def test_node_script_reports_a_bad_config_in_one_line(tmp_path):
    path = write_yaml(tmp_path / "node.yaml", {"ae_title": "ICH", "callers": []})
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({k: str(tmp_path / v) for k, v in SETTINGS_TEMPLATE.items()}))
    import subprocess
    import sys
    from conftest import REPO
    out = subprocess.run([sys.executable, "dicom_node.py", "--settings", str(settings), "--config",
                          "configs/predict/demo.yaml", "--node-config", str(path)], capture_output=True, text=True,
                         cwd=REPO)
    assert_one_line_error(out, "node.yaml: callers is empty")
