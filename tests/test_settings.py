"""Settings precedence (arguments > environment > TOML file > defaults) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatstream import ChatStream
from chatstream.settings import SettingsError, load_settings
from chatstream.testing import isolated_plugins


def test_documented_defaults() -> None:
    s = load_settings()
    assert (s.num_of_concurrent_executions, s.max_queue_size) == (2, 5)
    assert s.too_many_request_as_http_error is False and s.use_mock_response is False
    assert s.mock_params == {"type": "round"}
    assert (s.max_new_tokens, s.context_len, s.temperature, s.top_k, s.top_p) == (256, 1024, 1.0, 50, 1.0)
    assert s.repetition_penalty is None and s.repetition_penalty_method == "multiplicative"


def test_precedence_arguments_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "chatstream.toml"
    config.write_text(
        'max_queue_size = 7\nmax_new_tokens = 99\ntemperature = 0.3\n[sampling]\npipeline = ["top_k"]\n'
    )
    monkeypatch.setenv("CHATSTREAM_MAX_NEW_TOKENS", "55")
    monkeypatch.setenv("CHATSTREAM_TEMPERATURE", "0.5")
    s = load_settings(config, temperature=0.9)
    assert s.max_queue_size == 7  # file only
    assert s.max_new_tokens == 55  # env beats file
    assert s.temperature == 0.9  # argument beats env
    assert s.sampling.pipeline == ["top_k"]


def test_nested_and_plugin_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSTREAM_SAMPLING__PIPELINE", '["temperature","top_p"]')
    monkeypatch.setenv("CHATSTREAM_PLUGIN_CONFIG__MEMORY__TTL_S", "60")
    monkeypatch.setenv("CHATSTREAM_PLUGIN_CONFIG__REDIS__URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("CHATSTREAM_PLUGIN_CONFIG__UPSTREAM__HEADERS", '{"X-A": "1"}')
    monkeypatch.setenv("CHATSTREAM_BLOCK_PLUGINS", "a,b")
    s = load_settings()
    assert s.sampling.pipeline == ["temperature", "top_p"]
    # Plugin options from the environment: JSON values decoded, other text kept as text.
    assert s.plugin_config["memory"] == {"ttl_s": 60}
    assert s.plugin_config["redis"] == {"url": "redis://127.0.0.1:6390/0"}
    assert s.plugin_config["upstream"] == {"headers": {"X-A": "1"}}
    assert s.block_plugins == ["a", "b"]


def test_bad_value_names_the_setting_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS", "zero")
    with pytest.raises(
        SettingsError, match=r"'num_of_concurrent_executions'.*CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS"
    ):
        load_settings()


def test_out_of_range_and_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="top_p"):
        load_settings(top_p=1.5)
    config = tmp_path / "bad.toml"
    config.write_text("max_queue_sise = 3\n")
    with pytest.raises(SettingsError, match="max_queue_sise"):
        load_settings(config)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_constructor_arguments_win_and_unset_ones_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSTREAM_MAX_QUEUE_SIZE", "9")
    monkeypatch.setenv("CHATSTREAM_NUM_OF_CONCURRENT_EXECUTIONS", "3")
    cs = ChatStream(use_mock_response=True, num_of_concurrent_executions=4, plugins=isolated_plugins())
    assert cs.get_load()["max_processing"] == 4
    assert cs.get_load()["max_waiting"] == 9


def test_invalid_constructor_option_is_refused_with_its_name() -> None:
    with pytest.raises(SettingsError, match="max_queue_size"):
        ChatStream(use_mock_response=True, max_queue_size=-1, plugins=isolated_plugins())
    with pytest.raises(ValueError, match=r"'mock_params\.type': .*\(got 'nope'\)"):
        ChatStream(use_mock_response=True, mock_params={"type": "nope"}, plugins=isolated_plugins())
