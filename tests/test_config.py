"""Unit tests of `config`: TOML + environment -> frozen dataclasses, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from ds2oai.config import (
    Config,
    MiddlewareConfig,
    ModelsConfig,
    config_from_mapping,
    load_config,
)
from ds2oai.errors import ConfigError

SPEC_TOML = """
[upstream]
base_url = "http://127.0.0.1:9001"
read_timeout = 120.0        # seconds of upstream silence before the stream counts as broken
connect_timeout = 10.0

[retry]
max_retries = 2             # extra attempts, only before any byte went downstream

[auth]
api_keys = []               # empty: no client auth (then bind to loopback by default)

[models]                    # exposed name -> upstream model; unknown names go to the default
default = "deepseek-chat"
aliases = { "gpt-4.1-compatible" = "deepseek-chat" }

[middleware]
chain = ["auth", "rate_limit", "retry", "reframe"]   # built-in names or "module:attr" paths
"""

UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"
CLIENT_KEY = "client-key-SECRET-abcdef"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ds2oai.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return str(info.value)


# --------------------------------------------------------------------------- defaults and keys


def test_defaults_without_file_or_environment() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8000
    assert config.upstream.base_url == "http://127.0.0.1:9001"
    assert config.upstream.read_timeout == 120.0
    assert config.upstream.connect_timeout == 10.0
    assert config.upstream.api_key == ""
    assert config.retry.max_retries == 2
    assert config.auth.api_keys == ()
    assert config.models.default == "deepseek-chat"
    assert config.middleware.chain == ("auth", "rate_limit", "retry", "reframe")
    assert config.middleware.options == {}


def test_every_spec_key_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SPEC_TOML), env={})
    assert config.upstream.base_url == "http://127.0.0.1:9001"
    assert config.upstream.read_timeout == 120.0
    assert config.upstream.connect_timeout == 10.0
    assert config.retry.max_retries == 2
    assert config.auth.api_keys == ()
    assert config.models.default == "deepseek-chat"
    assert dict(config.models.aliases) == {"gpt-4.1-compatible": "deepseek-chat"}
    assert config.middleware.chain == ("auth", "rate_limit", "retry", "reframe")


def test_file_values_override_defaults(tmp_path: Path) -> None:
    text = """
[server]
host = "0.0.0.0"
port = 8123
[upstream]
base_url = "https://api.deepseek.com"
read_timeout = 30
connect_timeout = 2.5
[retry]
max_retries = 5
base_delay = 0.1
max_delay = 2
retry_after_cap = 10
deadline = 20
[rate_limit]
default_retry_after = 3.0
[auth]
api_keys = ["k1", "k2"]
[models]
default = "deepseek-reasoner"
aliases = { "gpt-4o" = "deepseek-chat" }
[logging]
level = "debug"
access_log = false
"""
    config = load_config(write(tmp_path, text), env={})
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8123)
    assert config.upstream.base_url == "https://api.deepseek.com"
    assert config.upstream.read_timeout == 30.0
    assert isinstance(config.upstream.read_timeout, float)
    assert config.upstream.connect_timeout == 2.5
    assert dataclasses.astuple(config.retry) == (5, 0.1, 2.0, 10.0, 20.0)
    assert config.rate_limit.default_retry_after == 3.0
    assert config.auth.api_keys == ("k1", "k2")
    assert config.models.default == "deepseek-reasoner"
    assert config.models.upstream_name("gpt-4o") == "deepseek-chat"
    assert config.logging.level == "debug"
    assert config.logging.access_log is False


def test_config_path_comes_from_ds2oai_config_when_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, "[retry]\nmax_retries = 7\n")
    config = load_config(None, env={"DS2OAI_CONFIG": str(path)})
    assert config.retry.max_retries == 7


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retry = config.retry  # type: ignore[misc]


# --------------------------------------------------------------------------- environment


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nhost = "127.0.0.1"\nport = 8000\n[upstream]\nbase_url = "http://file:1"\n',
    )
    env = {
        "UPSTREAM_BASE_URL": "https://env.example:9443",
        "DEEPSEEK_API_KEY": UPSTREAM_KEY,
        "HOST": "0.0.0.0",
        "PORT": "9100",
    }
    config = load_config(path, env=env)
    assert config.upstream.base_url == "https://env.example:9443"
    assert config.upstream.api_key == UPSTREAM_KEY
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9100


def test_empty_environment_values_do_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\nbase_url = "http://file:1"\n[server]\nport = 8111\n')
    config = load_config(path, env={"UPSTREAM_BASE_URL": "", "PORT": ""})
    assert config.upstream.base_url == "http://file:1"
    assert config.server.port == 8111


def test_process_environment_is_not_read_when_env_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PORT", "9999")
    assert load_config(None, env={}).server.port == 8000


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "server.port"),
        ({"UPSTREAM_BASE_URL": "ftp://x"}, "upstream.base_url"),
    ],
)
def test_bad_environment_values_are_config_errors(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, env=env)


def test_api_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n')
    with pytest.raises(ConfigError, match=re.escape("upstream.api_key")) as info:
        load_config(path, env={})
    assert UPSTREAM_KEY not in str(info.value)


# --------------------------------------------------------------------------- errors


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml", env={})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[retry\nmax_retries = 1\n"), env={})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"retry": {"max_retrys": 2}}, "retry.max_retrys"),
        ({"upstream": {"base_uri": "http://x"}}, "upstream.base_uri"),
        ({"server": {"hots": "x"}}, "server.hots"),
        ({"auth": {"keys": []}}, "auth.keys"),
        ({"models": {"alias": {}}}, "models.alias"),
        ({"middleware": {"order": []}}, "middleware.order"),
        ({"logging": {"lvl": "info"}}, "logging.lvl"),
    ],
)
def test_unknown_key_is_an_error_naming_it(data: dict[str, Any], key: str) -> None:
    message = config_error(data)
    assert key in message
    assert "unknown key" in message


def test_unknown_section_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstreams: unknown section"):
        load_config(write(tmp_path, '[upstreams]\nbase_url = "http://x"\n'), env={})


def test_top_level_key_outside_a_section_is_an_error_naming_it() -> None:
    assert "max_retries" in config_error({"max_retries": 2})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"retry": {"max_retries": "2"}}, "retry.max_retries"),
        ({"retry": {"max_retries": 2.5}}, "retry.max_retries"),
        ({"retry": {"max_retries": True}}, "retry.max_retries"),
        ({"upstream": {"read_timeout": "120"}}, "upstream.read_timeout"),
        ({"upstream": {"connect_timeout": False}}, "upstream.connect_timeout"),
        ({"upstream": {"base_url": 9001}}, "upstream.base_url"),
        ({"server": {"port": "8000"}}, "server.port"),
        ({"auth": {"api_keys": "k1"}}, "auth.api_keys"),
        ({"auth": {"api_keys": ["k1", 2]}}, "auth.api_keys[1]"),
        ({"models": {"default": ["deepseek-chat"]}}, "models.default"),
        ({"models": {"aliases": ["a"]}}, "models.aliases"),
        ({"models": {"aliases": {"a": 1}}}, "models.aliases.a"),
        ({"middleware": {"chain": "reframe"}}, "middleware.chain"),
        ({"middleware": {"chain": ["reframe", 3]}}, "middleware.chain[1]"),
        ({"logging": {"access_log": "yes"}}, "logging.access_log"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(data: dict[str, Any], key: str) -> None:
    message = config_error(data)
    assert message.startswith(key + ":"), message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"workers": 0}}, "server.workers"),
        ({"upstream": {"base_url": "127.0.0.1:9001"}}, "upstream.base_url"),
        ({"upstream": {"read_timeout": 0}}, "upstream.read_timeout"),
        ({"upstream": {"connect_timeout": -1}}, "upstream.connect_timeout"),
        ({"retry": {"max_retries": -1}}, "retry.max_retries"),
        ({"retry": {"deadline": -1}}, "retry.deadline"),
        ({"rate_limit": {"default_retry_after": 0}}, "rate_limit.default_retry_after"),
        ({"auth": {"api_keys": [""]}}, "auth.api_keys"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"middleware": {"chain": []}}, "middleware.chain"),
    ],
)
def test_out_of_range_values_are_errors_naming_the_key(data: dict[str, Any], key: str) -> None:
    assert config_error(data).startswith(key + ":")


def test_check_messages_name_the_file_key_not_the_value() -> None:
    message = config_error({"auth": {"api_keys": [CLIENT_KEY, 5]}})
    assert CLIENT_KEY not in message


# --------------------------------------------------------------------------- middleware section


def test_middleware_options_tables_are_collected_by_name() -> None:
    config = config_from_mapping(
        {
            "middleware": {
                "chain": ["auth", "mod:Extra", "reframe"],
                "paths": ["plugins"],
                "extra": {"tag": "x", "times": 2},
            }
        }
    )
    assert config.middleware == MiddlewareConfig(
        chain=("auth", "mod:Extra", "reframe"),
        paths=("plugins",),
        options={"extra": {"tag": "x", "times": 2}},
    )


def test_middleware_options_from_a_toml_subtable(tmp_path: Path) -> None:
    text = '[middleware]\nchain = ["x:Y", "reframe"]\n[middleware.y]\nlevel = 3\n'
    config = load_config(write(tmp_path, text), env={})
    assert config.middleware.options == {"y": {"level": 3}}


# --------------------------------------------------------------------------- models


def test_models_map_aliases_native_names_and_unknown_names() -> None:
    models = ModelsConfig(aliases={"gpt-4.1-compatible": "deepseek-chat"})
    assert models.upstream_name("gpt-4.1-compatible") == "deepseek-chat"
    assert models.upstream_name("deepseek-reasoner") == "deepseek-reasoner"
    assert models.upstream_name("unknown-model") == "deepseek-chat"
    assert models.upstream_name(None) == "deepseek-chat"
    names = models.exposed_names()
    assert names[0] == "deepseek-chat"
    assert "gpt-4.1-compatible" in names
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- secrets


def test_repr_never_shows_the_upstream_key_or_client_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f'[auth]\napi_keys = ["{CLIENT_KEY}", "second-client-key-XYZ"]\n')
    config = load_config(path, env={"DEEPSEEK_API_KEY": UPSTREAM_KEY})
    assert config.upstream.api_key == UPSTREAM_KEY
    assert config.auth.api_keys == (CLIENT_KEY, "second-client-key-XYZ")
    for text in (repr(config), str(config), repr(config.upstream), repr(config.auth)):
        assert UPSTREAM_KEY not in text
        assert CLIENT_KEY not in text
        assert "second-client-key-XYZ" not in text
    assert UPSTREAM_KEY not in repr(config.upstream.api_key)
    assert CLIENT_KEY not in repr(config.auth.api_keys)


def test_upstream_secrets_hold_every_upstream_key(tmp_path: Path) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(
        '[pool.a]\nbase_url = "http://127.0.0.1:1"\n'
        '[pool.b]\nbase_url = "http://127.0.0.1:2"\nkey_env = "B_KEY"\n'
        '[pool.c]\nbase_url = "http://127.0.0.1:3"\nkey_env = "UNSET_KEY"\n'
    )
    config = load_config(path, {"DEEPSEEK_API_KEY": "main-key", "B_KEY": "b-key"})
    assert config.upstream_secrets() == ("main-key", "b-key")  # once each, none empty


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nshutdown_grace = -1\n", "server.shutdown_grace: must be >= 0"),
        ("[server]\nshutdown_grace = nan\n", "server.shutdown_grace: expected a finite number"),
        ("[server]\nshutdown_grace = inf\n", "server.shutdown_grace: expected a finite number"),
        ("[upstream]\nread_timeout = nan\n", "upstream.read_timeout: expected a finite number"),
        ("[retry]\ndeadline = -inf\n", "retry.deadline: expected a finite number"),
    ],
)
def test_numbers_that_are_not_usable_stop_start_up(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, {})


@pytest.mark.parametrize("key", ["sk-abc\n", "sk-a\r\nX-Evil: 1", "sk a", "sk-é"])
def test_an_upstream_key_that_cannot_go_in_a_header_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="upstream key") as info:
        load_config(None, env={"DEEPSEEK_API_KEY": key})
    assert key.strip() not in str(info.value)


def test_a_key_is_either_a_named_client_or_in_api_keys() -> None:
    data = {"auth": {"api_keys": ["sk-shared-1"], "clients": {"team": {"key": "sk-shared-1"}}}}
    with pytest.raises(ConfigError, match=r"auth\.clients\.team: same key as one of") as info:
        config_from_mapping(data)
    assert "sk-shared-1" not in str(info.value)
