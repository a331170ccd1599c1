"""Configuration: TOML file + environment -> frozen dataclasses.

Precedence: environment over file over built-in defaults. Unknown keys and wrong types are
`ConfigError`s naming the key (`retry.max_retries: expected an integer`), so a typo stops
start-up instead of being silently ignored. This module reads files and `os.environ` only;
it does not import middleware (the chain loader in `chain.py` does that).
"""

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from ds2oai.errors import ConfigError
from ds2oai.store.base import StoreConfig

__all__ = [
    "AuthConfig",
    "BalancerConfig",
    "ClientKeyConfig",
    "Config",
    "LimitsConfig",
    "LoggingConfig",
    "MiddlewareConfig",
    "ModelsConfig",
    "PoolTargetConfig",
    "RateLimitConfig",
    "ResponsesConfig",
    "ResumeConfig",
    "RetryConfig",
    "Secret",
    "ServerConfig",
    "UpstreamConfig",
    "load_config",
]


_T = TypeVar("_T")


class Secret(str):
    """A string whose repr never shows its value (keys end up in tracebacks otherwise)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 10.0
    workers: int = 1
    keepalive_interval: float = 15.0
    uvloop: bool = True  # run on uvloop when it is installed
    header_timeout: float = 10.0  # a request head must arrive within this (also keep-alive idle)
    body_timeout: float = 30.0  # the request body must arrive within this
    backlog: int = 1024  # listen queue for bursts of new connections


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = "http://127.0.0.1:9001"
    read_timeout: float = 120.0
    connect_timeout: float = 10.0
    max_connections: int = 4096
    api_key: Secret = field(default=Secret(""), repr=False)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 2
    base_delay: float = 0.5
    max_delay: float = 8.0
    retry_after_cap: float = 30.0
    deadline: float = 60.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    default_retry_after: float = 1.0


@dataclass(frozen=True, slots=True)
class ClientKeyConfig:
    """`[auth.clients.<name>]`: one named client key with its own settings.

    The key is `key` (in the file) or read from the environment variable named by `key_env`.
    `models`: exposed model names this key may use (empty: all). The three limits override
    `[limits]` for this key; None (left out) means "as in [limits]", 0 means unlimited.
    """

    key: Secret = field(default=Secret(""), repr=False)
    key_env: str = ""
    models: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None

    def sets_limits(self) -> bool:
        limits = (self.requests_per_minute, self.tokens_per_minute, self.concurrent_streams)
        return any(value is not None and value > 0 for value in limits)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    # Accepted keys: this list, the lines of `key_file` and DS2OAI_API_KEYS (comma-separated),
    # merged at load time; plus every `[auth.clients.<name>]` key.
    api_keys: tuple[Secret, ...] = field(default=(), repr=False)
    key_file: str = ""
    clients: Mapping[str, ClientKeyConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`[limits]`: per client key (see `ds2oai.middleware.limits`); 0 = unlimited.

    Counted in this process's memory unless `redis_url` is set (DS2OAI_LIMITS_REDIS_URL
    overrides), then shared by every process using that Redis. `on_redis_error`: "open" lets
    requests through while Redis is unreachable, "closed" refuses them with a 503.
    """

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_streams: int = 0
    # SECURITY: the URL may carry a password (redis://:pw@host); keep it out of reprs.
    redis_url: str = field(default="", repr=False)
    on_redis_error: str = "open"

    def sets_limits(self) -> bool:
        limits = (self.requests_per_minute, self.tokens_per_minute, self.concurrent_streams)
        return any(value > 0 for value in limits)


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    default: str = "deepseek-chat"
    aliases: Mapping[str, str] = field(default_factory=dict)
    native: tuple[str, ...] = (
        "deepseek-chat",
        "deepseek-reasoner",
        "deepseek-v4-flash",
        "deepseek-v4-pro",
    )

    def upstream_name(self, requested: str | None) -> str:
        """The upstream model for a client's model name: alias, native name, else the default."""
        if requested is None:
            return self.default
        alias = self.aliases.get(requested)
        if alias is not None:
            return alias
        if requested in self.native:
            return requested
        return self.default

    def exposed_names(self) -> list[str]:
        names = [self.default, *self.aliases, *self.native]
        return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class MiddlewareConfig:
    chain: tuple[str, ...] = ("auth", "rate_limit", "retry", "reframe")
    paths: tuple[str, ...] = (".",)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    access_log: bool = True
    # Off by default: prompts are user data. On, the request line carries the client's
    # `messages` / `input` / `instructions` (never headers, never keys).
    log_content: bool = False


@dataclass(frozen=True, slots=True)
class PoolTargetConfig:
    """`[pool.<name>]`: one more upstream (DeepSeek itself or any OpenAI-compatible host serving
    DeepSeek models). With no `[pool.*]` tables, `[upstream]` is the only upstream."""

    base_url: str = ""
    key_env: str = "DEEPSEEK_API_KEY"  # the environment variable holding this host's key
    weight: float = 1.0
    models: Mapping[str, str] = field(default_factory=dict)  # upstream model -> this host's name
    api_key: Secret = field(default=Secret(""), repr=False)  # filled from key_env, never the file


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """`[balancer]`: circuit breakers per upstream and the retry budget (Envoy's idea)."""

    failure_threshold: int = 5  # failures within failure_window open an upstream's breaker
    failure_window: float = 30.0
    open_seconds: float = 30.0  # then one half-open probe
    retry_budget_ratio: float = 0.2  # retries may add at most this fraction of requests
    retry_budget_min: int = 10  # ... but at least this many per 10 s


@dataclass(frozen=True, slots=True)
class ResumeConfig:
    """`[resume]`: continue a stream that broke mid-way with DeepSeek chat prefix completion."""

    enabled: bool = False
    max_attempts: int = 2
    beta_base_url: str = ""  # default: {upstream.base_url}/beta

    def endpoint(self, upstream_base_url: str) -> str:
        base = self.beta_base_url or upstream_base_url.rstrip("/") + "/beta"
        return base.rstrip("/") + "/chat/completions"


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    # Secret for sealing reasoning into `encrypted_content`; DS2OAI_SECRET overrides. Unset: a
    # per-process random key (blobs do not survive restarts or cross workers).
    secret: Secret = field(default=Secret(""), repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    middleware: MiddlewareConfig = field(default_factory=MiddlewareConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    pool: Mapping[str, PoolTargetConfig] = field(default_factory=dict)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def upstream_secrets(self) -> tuple[str, ...]:
        """Every upstream key the gateway sends (`[upstream]` and each `[pool.*]` host): words
        from an upstream reach clients only with these removed."""
        keys = [self.upstream.api_key, *(target.api_key for target in self.pool.values())]
        return tuple(dict.fromkeys(str(key) for key in keys if key))


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a dataclass field's type hint; return it in the field's type."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return Secret(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number")
        if not math.isfinite(value):  # TOML has nan and inf; no key means anything by them
            raise ConfigError(f"{key}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        k_hint, v_hint = typing.get_args(hint)
        return {
            _convert(k, k_hint, key): _convert(v, v_hint, f"{key}.{k}") for k, v in value.items()
        }
    if origin in (Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - no such fields
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover


def _build_section(cls: type[_T], data: Mapping[str, Any], prefix: str) -> _T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _pool_section(data: Mapping[str, Any]) -> dict[str, PoolTargetConfig]:
    pool: dict[str, PoolTargetConfig] = {}
    for name, value in data.items():
        prefix = f"pool.{name}."
        if not isinstance(value, Mapping):
            raise ConfigError(f"pool.{name}: expected a [pool.{name}] table")
        if "api_key" in value:
            raise ConfigError(f"{prefix}api_key: name an environment variable with key_env")
        target = _build_section(PoolTargetConfig, value, prefix)
        if not target.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}base_url: must start with http:// or https://")
        if target.weight < 0:
            raise ConfigError(f"{prefix}weight: must be >= 0")
        pool[name] = target
    if pool and not any(t.weight > 0 for t in pool.values()):
        raise ConfigError("pool: at least one upstream needs a weight above 0")
    return pool


def _middleware_section(data: Mapping[str, Any]) -> MiddlewareConfig:
    plain = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    options = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    for key in plain:
        if key not in ("chain", "paths"):
            raise ConfigError(f"middleware.{key}: unknown key")
    section = _build_section(MiddlewareConfig, plain, "middleware.")
    return dataclasses.replace(section, options={k: dict(v) for k, v in options.items()})


_CLIENT_LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")


def _client_section(name: str, data: Mapping[str, Any]) -> ClientKeyConfig:
    prefix = f"auth.clients.{name}."
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix[:-1]}: expected a table")
    limits = {k: _convert(data[k], int, prefix + k) for k in _CLIENT_LIMITS if k in data}
    rest = {k: v for k, v in data.items() if k not in _CLIENT_LIMITS}
    if "key" in rest and "key_env" in rest:
        raise ConfigError(f"{prefix}key: set key or key_env, not both")
    section = _build_section(ClientKeyConfig, rest, prefix)
    return dataclasses.replace(section, **limits)


def _read_key_file(path: str) -> tuple[Secret, ...]:
    """One key per line; blank lines and lines starting with `#` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"auth.key_file: cannot read {path}: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(Secret(line) for line in lines if line and not line.startswith("#"))


def _auth_section(data: Mapping[str, Any]) -> AuthConfig:
    clients = data.get("clients", {})
    if not isinstance(clients, Mapping):
        raise ConfigError("auth.clients: expected a table of [auth.clients.<name>] tables")
    plain = {k: v for k, v in data.items() if k != "clients"}
    section = _build_section(AuthConfig, plain, "auth.")
    keys = section.api_keys
    if section.key_file:
        keys = (*keys, *_read_key_file(section.key_file))
    built = {name: _client_section(name, value) for name, value in clients.items()}
    return dataclasses.replace(section, api_keys=tuple(dict.fromkeys(keys)), clients=built)


def _validate_auth_and_limits(config: Config) -> None:
    if any(not k for k in config.auth.api_keys):
        raise ConfigError("auth.api_keys: keys must not be empty strings")
    seen: dict[str, str] = {}
    for name, client in config.auth.clients.items():
        prefix = f"auth.clients.{name}"
        if not client.key and not client.key_env:
            raise ConfigError(f"{prefix}: set key or key_env")
        if any(not model for model in client.models):
            raise ConfigError(f"{prefix}.models: names must not be empty strings")
        for limit in _CLIENT_LIMITS:
            value = getattr(client, limit)
            if value is not None and value < 0:
                raise ConfigError(f"{prefix}.{limit}: must be >= 0 (0 = unlimited)")
        if client.key:
            if client.key in seen:
                raise ConfigError(f"{prefix}: same key as auth.clients.{seen[client.key]}")
            if client.key in config.auth.api_keys:
                # Which would it be: the named client with its models and limits, or not?
                raise ConfigError(f"{prefix}: same key as one of auth.api_keys")
            seen[client.key] = name
    limits = config.limits
    for limit in _CLIENT_LIMITS:
        if getattr(limits, limit) < 0:
            raise ConfigError(f"limits.{limit}: must be >= 0 (0 = unlimited)")
    if limits.on_redis_error not in ("open", "closed"):
        raise ConfigError("limits.on_redis_error: one of open, closed")
    for name, url in (("limits", limits.redis_url), ("store", config.store.redis_url)):
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{name}.redis_url: must start with redis://, rediss:// or unix://")


def _validate(config: Config) -> None:
    s, u, r = config.server, config.upstream, config.retry
    if not 0 <= s.port <= 65535:
        raise ConfigError("server.port: must be 0..65535")
    if s.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes: must be at least 1024")
    for name in ("header_timeout", "body_timeout"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"server.{name}: must be positive")
    if s.shutdown_grace < 0:
        raise ConfigError("server.shutdown_grace: must be >= 0 (0 = cut open streams at once)")
    if s.backlog < 1:
        raise ConfigError("server.backlog: must be at least 1")
    if s.keepalive_interval < 0:
        raise ConfigError("server.keepalive_interval: must be >= 0 (0 = off)")
    if s.workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    if not u.base_url.startswith(("http://", "https://")):
        raise ConfigError("upstream.base_url: must start with http:// or https://")
    for key in config.upstream_secrets():
        # It goes into a header line as it is (a stray newline from `echo` or a file, say).
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise ConfigError(
                "upstream key (DEEPSEEK_API_KEY, or a [pool.*] host's key_env): must be "
                "printable ASCII with no spaces or line breaks"
            )
    for name in ("read_timeout", "connect_timeout"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"upstream.{name}: must be positive")
    if u.max_connections < 0:
        raise ConfigError("upstream.max_connections: must be >= 0 (0 = unlimited)")
    if r.max_retries < 0:
        raise ConfigError("retry.max_retries: must be >= 0")
    for name in ("base_delay", "max_delay", "retry_after_cap", "deadline"):
        if getattr(r, name) < 0:
            raise ConfigError(f"retry.{name}: must be >= 0")
    if config.rate_limit.default_retry_after <= 0:
        raise ConfigError("rate_limit.default_retry_after: must be positive")
    _validate_auth_and_limits(config)
    if config.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("logging.level: one of debug, info, warning, error")
    b = config.balancer
    if b.failure_threshold < 1:
        raise ConfigError("balancer.failure_threshold: must be at least 1")
    for name in ("failure_window", "open_seconds", "retry_budget_ratio"):
        if getattr(b, name) < 0:
            raise ConfigError(f"balancer.{name}: must be >= 0")
    if b.retry_budget_min < 0:
        raise ConfigError("balancer.retry_budget_min: must be >= 0")
    if config.resume.max_attempts < 1:
        raise ConfigError("resume.max_attempts: must be at least 1")
    if config.resume.beta_base_url and not config.resume.beta_base_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError("resume.beta_base_url: must start with http:// or https://")
    if not config.middleware.chain:
        raise ConfigError("middleware.chain: must not be empty (it needs at least 'reframe')")


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "retry": RetryConfig,
    "rate_limit": RateLimitConfig,
    "models": ModelsConfig,
    "logging": LoggingConfig,
    "store": StoreConfig,
    "responses": ResponsesConfig,
    "resume": ResumeConfig,
    "balancer": BalancerConfig,
    "limits": LimitsConfig,
}


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a `Config` from parsed TOML (no environment applied)."""
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: unknown key (expected a [section])")
        if name == "pool":
            sections[name] = _pool_section(value)
        elif name == "middleware":
            sections[name] = _middleware_section(value)
        elif name == "auth":
            sections[name] = _auth_section(value)
        elif name in _SECTIONS:
            if name == "upstream" and "api_key" in value:
                raise ConfigError(
                    "upstream.api_key: set the key with DEEPSEEK_API_KEY, not the file"
                )
            sections[name] = _build_section(_SECTIONS[name], value, f"{name}.")
        else:
            raise ConfigError(f"{name}: unknown section")
    config = Config(**sections)
    _validate(config)
    return config


def _apply_env(config: Config, env: Mapping[str, str]) -> Config:
    upstream = config.upstream
    if env.get("UPSTREAM_BASE_URL"):
        upstream = dataclasses.replace(upstream, base_url=env["UPSTREAM_BASE_URL"])
    if env.get("DEEPSEEK_API_KEY"):
        upstream = dataclasses.replace(upstream, api_key=Secret(env["DEEPSEEK_API_KEY"]))
    server = config.server
    if env.get("HOST"):
        server = dataclasses.replace(server, host=env["HOST"])
    if env.get("PORT"):
        try:
            server = dataclasses.replace(server, port=int(env["PORT"]))
        except ValueError:
            raise ConfigError("environment: PORT: expected an integer") from None
    pool = {
        name: dataclasses.replace(target, api_key=Secret(env.get(target.key_env, "")))
        for name, target in config.pool.items()
    }
    config = dataclasses.replace(config, pool=pool)
    responses = config.responses
    if env.get("DS2OAI_SECRET"):
        responses = dataclasses.replace(responses, secret=Secret(env["DS2OAI_SECRET"]))
    store = config.store
    if env.get("DS2OAI_REDIS_URL"):
        store = dataclasses.replace(store, redis_url=env["DS2OAI_REDIS_URL"])
    limits = config.limits
    if env.get("DS2OAI_LIMITS_REDIS_URL"):
        limits = dataclasses.replace(limits, redis_url=env["DS2OAI_LIMITS_REDIS_URL"])
    return dataclasses.replace(
        config,
        upstream=upstream,
        server=server,
        responses=responses,
        store=store,
        limits=limits,
        auth=_auth_from_env(config.auth, env),
    )


def _auth_from_env(auth: AuthConfig, env: Mapping[str, str]) -> AuthConfig:
    """DS2OAI_API_KEYS (comma-separated) joins `api_keys`; `key_env` names are read."""
    keys = auth.api_keys
    if env.get("DS2OAI_API_KEYS"):
        extra = (Secret(k.strip()) for k in env["DS2OAI_API_KEYS"].split(","))
        keys = tuple(dict.fromkeys((*keys, *(k for k in extra if k))))
    clients = dict(auth.clients)
    for name, client in auth.clients.items():
        if client.key_env:
            value = env.get(client.key_env, "")
            if not value:
                raise ConfigError(
                    f"auth.clients.{name}.key_env: environment variable {client.key_env} "
                    "is not set or empty"
                )
            clients[name] = dataclasses.replace(client, key=Secret(value))
    return dataclasses.replace(auth, api_keys=keys, clients=clients)


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Read `path` (or `DS2OAI_CONFIG`) and apply the environment over it."""
    env = os.environ if env is None else env
    if path is None and env.get("DS2OAI_CONFIG"):
        path = env["DS2OAI_CONFIG"]
    data: Mapping[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    config = _apply_env(config_from_mapping(data), env)
    _validate(config)
    return config
