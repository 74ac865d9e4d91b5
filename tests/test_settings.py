import json

import pytest

from ich.config import ConfigError, load_prepare_config
from ich.settings import KEYS, SettingsError, load_settings
from conftest import REPO, SETTINGS_TEMPLATE


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({**SETTINGS_TEMPLATE, "LOGS_DIR": "/abs/logs"}))
    s = load_settings(tmp_path / "s.json")
    assert s.raw_data_dir == tmp_path / "raw"
    assert str(s.logs_dir) == "/abs/logs"


@pytest.mark.parametrize("key", KEYS)
def test_missing_key_is_named(tmp_path, key):
    data = dict(SETTINGS_TEMPLATE)
    del data[key]
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(SettingsError, match=key):
        load_settings(tmp_path / "s.json")


def test_unreadable_settings(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SettingsError, match="not readable JSON"):
        load_settings(tmp_path / "bad.json")


def test_shipped_files_load():
    load_settings(REPO / "SETTINGS.json")
    for path in (REPO / "configs" / "prepare").glob("*.yaml"):
        load_prepare_config(path)


def test_prepare_config_rejects_typos(tmp_path):
    (tmp_path / "c.yaml").write_text("image_sise: 128\n")
    with pytest.raises(ConfigError, match="image_sise"):
        load_prepare_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("windows: [{name: brain, center: 40}]\n")
    with pytest.raises(ConfigError, match="windows"):
        load_prepare_config(tmp_path / "c.yaml")
