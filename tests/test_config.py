"""servekit.config: Java-properties parsing and settings from the file, then TS_* variables, then flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from servekit.config import load_settings, parse_properties
from servekit.errors import ConfigError
from servekit.settings import Address, Settings


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ./config.properties from the caller's directory is read."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def properties(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parse_properties_accepts_equals_colon_and_space_separators() -> None:
    text = "a=1\nb: 2\nc 3\nd = 4\ne:5\nf\t6\n"
    assert parse_properties(text) == {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}


def test_parse_properties_skips_comments_and_blank_lines() -> None:
    text = "# a comment=1\n! another: comment\n\n   \n  # indented comment\nkey=value # not a comment\n"
    assert parse_properties(text) == {"key": "value # not a comment"}


def test_parse_properties_strips_leading_whitespace() -> None:
    assert parse_properties("   job_queue_size = 10\n\tmodel_store=/models\n") == {
        "job_queue_size": "10",
        "model_store": "/models",
    }


def test_parse_properties_joins_backslash_continuation_lines() -> None:
    text = "load_models=a.mar,\\\n            b.mar,\\\n    c.mar\nnext=1\n"
    assert parse_properties(text) == {"load_models": "a.mar,b.mar,c.mar", "next": "1"}


def test_parse_properties_continuation_keeps_comment_like_lines() -> None:
    assert parse_properties("key=a\\\n# b\n") == {"key": "a# b"}


def test_parse_properties_even_backslashes_do_not_continue() -> None:
    assert parse_properties("path=C:\\\\dir\\\\\nnext=1\n") == {"path": "C:\\dir\\", "next": "1"}


def test_parse_properties_continuation_at_end_of_text() -> None:
    assert parse_properties("key=value\\") == {"key": "value"}


def test_parse_properties_unescapes_keys_and_values() -> None:
    text = "tab=a\\tb\nnl=a\\nb\nk\\=ey=v\nsp\\ ace=x\\:y\\\\z\n"
    assert parse_properties(text) == {"tab": "a\tb", "nl": "a\nb", "k=ey": "v", "sp ace": "x:y\\z"}


def test_parse_properties_unescapes_unicode() -> None:
    assert parse_properties("name=caf\\u00e9\n") == {"name": "café"}


def test_parse_properties_keeps_separators_inside_value() -> None:
    models = {"mlp": {"1.0": {"marName": "mlp.mar", "batchSize": 4}}}
    text = f"models={json.dumps(models)}\naddress=http://0.0.0.0:8080\nkey = a=b:c\n"
    parsed = parse_properties(text)
    assert json.loads(parsed["models"]) == models
    assert parsed["address"] == "http://0.0.0.0:8080"
    assert parsed["key"] == "a=b:c"


def test_parse_properties_key_without_value_is_empty_and_last_wins() -> None:
    assert parse_properties("flag\nx=1\nx=2\n") == {"flag": "", "x": "2"}


def test_load_settings_defaults_without_file_env_or_flags() -> None:
    settings = load_settings(environ={})
    assert settings.inference_address == Address("127.0.0.1", 8080)
    assert settings.management_address == Address("127.0.0.1", 8081)
    assert settings.metrics_address == Address("127.0.0.1", 8082)
    assert str(settings.inference_address) == "http://127.0.0.1:8080"
    assert settings.job_queue_size == 100
    assert settings.max_request_size == 6553500
    assert settings.disable_token_authorization is False
    assert settings.enable_model_api is False
    assert settings.model_store is None
    assert settings.load_models == ()
    assert settings == Settings()


def test_load_settings_reads_file_values(tmp_path: Path) -> None:
    store = tmp_path / "store"
    models = {"mlp": {"1.0": {"marName": "mlp.mar", "minWorkers": 2}}}
    config = properties(
        tmp_path / "config.properties",
        "inference_address=http://0.0.0.0:9080\n"
        "management_address=127.0.0.1:9081\n"
        f"model_store={store}\n"
        "load_models=a.mar, b.mar,\n"
        f"models={json.dumps(models)}\n"
        "job_queue_size=7\n"
        "default_response_timeout=2.5\n"
        "disable_token_authorization=true\n"
        "enable_model_api=TRUE\n"
        "number_of_gpu=0\n"
        # as in Java, a backslash in a properties value must itself be escaped
        "allowed_urls=https://example\\\\.com/.*,file:///models/.*\n",
    )
    settings = load_settings(config, environ={})
    assert settings.inference_address == Address("0.0.0.0", 9080)
    assert settings.management_address == Address("127.0.0.1", 9081)
    assert settings.model_store == store.resolve()
    assert settings.load_models == ("a.mar", "b.mar")
    assert settings.models == models
    assert settings.job_queue_size == 7
    assert settings.default_response_timeout == 2.5
    assert settings.disable_token_authorization is True
    assert settings.enable_model_api is True
    assert settings.number_of_gpu == 0
    assert settings.allowed_urls == (r"https://example\.com/.*", "file:///models/.*")
    assert settings.raw["job_queue_size"] == "7"


def test_load_settings_reads_config_properties_in_working_directory(empty_cwd: Path) -> None:
    properties(empty_cwd / "config.properties", "job_queue_size=12\n")
    assert load_settings(environ={}).job_queue_size == 12


def test_load_settings_ignores_ts_env_unless_enabled_in_file(tmp_path: Path) -> None:
    config = properties(tmp_path / "config.properties", "job_queue_size=5\n")
    environ = {"TS_JOB_QUEUE_SIZE": "7", "TS_ENABLE_MODEL_API": "true", "TS_ENABLE_ENVVARS_CONFIG": "true"}
    settings = load_settings(config, environ=environ)
    assert settings.job_queue_size == 5
    assert settings.enable_model_api is False


def test_load_settings_ts_env_overrides_file_when_enabled(tmp_path: Path) -> None:
    config = properties(
        tmp_path / "config.properties",
        "enable_envvars_config=true\njob_queue_size=5\ninference_address=http://127.0.0.1:9000\n",
    )
    environ = {
        "TS_JOB_QUEUE_SIZE": "7",
        "TS_ENABLE_MODEL_API": "true",
        "TS_MANAGEMENT_ADDRESS": "http://0.0.0.0:9001",
        "TS_MODEL_STORE": str(tmp_path),
    }
    settings = load_settings(config, environ=environ)
    assert settings.job_queue_size == 7
    assert settings.enable_model_api is True
    assert settings.management_address == Address("0.0.0.0", 9001)
    assert settings.inference_address == Address("127.0.0.1", 9000)  # no TS_ variable: the file's value
    assert settings.model_store == tmp_path.resolve()


def test_load_settings_flags_override_file_and_env(tmp_path: Path) -> None:
    config = properties(tmp_path / "config.properties", "enable_envvars_config=true\njob_queue_size=5\n")
    settings = load_settings(config, flags={"job_queue_size": "9"}, environ={"TS_JOB_QUEUE_SIZE": "7"})
    assert settings.job_queue_size == 9


def test_load_settings_ts_config_file_picks_file_when_none_given(tmp_path: Path, empty_cwd: Path) -> None:
    properties(empty_cwd / "config.properties", "job_queue_size=1\n")
    env_file = properties(tmp_path / "env.properties", "job_queue_size=2\n")
    assert load_settings(None, environ={"TS_CONFIG_FILE": str(env_file)}).job_queue_size == 2
    explicit = properties(tmp_path / "explicit.properties", "job_queue_size=3\n")
    assert load_settings(explicit, environ={"TS_CONFIG_FILE": str(env_file)}).job_queue_size == 3


def test_load_settings_missing_config_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*absent\.properties"):
        load_settings(tmp_path / "absent.properties", environ={})


def test_load_settings_expands_env_references(tmp_path: Path) -> None:
    config = properties(
        tmp_path / "config.properties",
        "model_store=$$STORE_ROOT$$/models\ninference_address=http://$$HOST$$:$$PORT$$\n",
    )
    settings = load_settings(config, environ={"STORE_ROOT": str(tmp_path), "HOST": "0.0.0.0", "PORT": "9123"})
    assert settings.model_store == (tmp_path / "models").resolve()
    assert settings.inference_address == Address("0.0.0.0", 9123)


def test_load_settings_missing_env_reference_names_variable(tmp_path: Path) -> None:
    config = properties(tmp_path / "config.properties", "model_store=$$NOT_SET_ANYWHERE$$\n")
    with pytest.raises(ConfigError, match="model_store: environment variable NOT_SET_ANYWHERE is not set"):
        load_settings(config, environ={})


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("job_queue_size=abc", "job_queue_size: expected a number"),
        ("job_queue_size=1.5", "job_queue_size: expected a number"),
        ("job_queue_size=-1", "job_queue_size: must not be negative"),
        ("default_workers_per_model=-2", "default_workers_per_model: must not be negative"),
        ("default_response_timeout=-0.5", "default_response_timeout: must not be negative"),
        ("number_of_gpu=-1", "number_of_gpu: must not be negative"),
        ("max_request_size=big", "max_request_size: expected a number"),
        ("inference_address=http://127.0.0.1", "inference_address: expected http://host:port"),
        ("management_address=ftp://127.0.0.1:21", "management_address: expected http://host:port"),
        ("models={not json", "models: not valid JSON"),
        ('models=["mlp"]', "models: expected"),
        ('models={"mlp": 1}', "models: expected"),
        ("allowed_urls=file://.*,[unclosed", "allowed_urls: bad pattern '\\[unclosed'"),
        ("disable_token_authorization=maybe", "disable_token_authorization: expected true or false"),
        ("enable_model_api=maybe", "enable_model_api: expected true or false"),
        ("enable_envvars_config=maybe", "enable_envvars_config: expected true or false"),
    ],
)
def test_load_settings_bad_value_is_config_error_naming_key(tmp_path: Path, line: str, match: str) -> None:
    config = properties(tmp_path / "config.properties", line + "\n")
    with pytest.raises(ConfigError, match=match):
        load_settings(config, environ={})


def test_load_settings_bad_flag_value_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job_queue_size: expected a number"):
        load_settings(None, flags={"job_queue_size": "lots"}, environ={})


@pytest.mark.parametrize("address", ["http://127.0.0.1:abc", "http://127.0.0.1:99999"])
def test_load_settings_bad_port_is_config_error(tmp_path: Path, address: str) -> None:
    config = properties(tmp_path / "config.properties", f"inference_address={address}\n")
    with pytest.raises(ConfigError, match="inference_address"):
        load_settings(config, environ={})
