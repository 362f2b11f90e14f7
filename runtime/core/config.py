"""The node configuration (``ca.json``), validated with pydantic.

Every key has a default except the actor types, so ``{}`` is a valid (if empty)
configuration. Keys whose name starts with ``//`` are comments and are ignored at
any depth: that is how ``ca.json.example`` documents itself while staying JSON.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from troth.core.errors import TrothError

BUILTIN_PLUGINS = ("log", "timers", "send", "http", "session")
#: Commitment-as-a-Service, on unless the configuration says otherwise.
DEFAULT_EXTENSIONS = ("troth.caas:CaaS",)


def _default_plugins() -> dict[str, dict[str, Any]]:
    return {name: {} for name in BUILTIN_PLUGINS}


class ConfigError(TrothError):
    """The configuration file is missing, not JSON, or not valid."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NodeConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8700, ge=0, le=65535, description="TCP port of the HTTP API (0: any).")
    node_id: str | None = Field(None, description="Stable node id; default: host-pid-random.")
    data_dir: str = Field(".troth", description="Embedded Redis data directory.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    call_timeout_seconds: float = Field(30.0, gt=0, description="Longest wait for a reply.")
    public_url: str | None = Field(None, description="URL other nodes use to reach this one.")
    max_connections: int = Field(
        4096, ge=1, description="Open HTTP and WebSocket connections; beyond it new ones get 503."
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="A connection must send its request head within this."
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=300, description="An idle kept-alive HTTP connection is closed after this."
    )
    access_log: bool = Field(
        False, description="Log every HTTP request (also: troth serve --access-log)."
    )


class RedisConfig(_Model):
    url: str | None = Field(None, description="redis:// or unix:// URL; none: embedded Redis.")
    key_prefix: str = Field("troth", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Longest wait for one Redis reply; past it calls answer 503.",
    )
    appendfsync: str = Field(
        "everysec",
        pattern=r"^(always|everysec|no)$",
        description="AOF fsync policy of the embedded Redis.",
    )
    wait_replicas: int = Field(
        0,
        ge=0,
        le=8,
        description="Replicas that must have every commit before it is acknowledged "
        "(WAIT); 0: acknowledge once the master has it.",
    )


class ClusterConfig(_Model):
    shards: int = Field(1024, ge=1, le=16384, description="Virtual shards; fixed per deployment.")
    lease_ttl_seconds: float = Field(5.0, gt=0, description="A silent node is dead after this.")
    heartbeat_seconds: float = Field(1.0, gt=0, description="Lease renewal interval.")

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> ClusterConfig:
        if self.heartbeat_seconds * 2 > self.lease_ttl_seconds:
            raise ValueError("heartbeat_seconds must be at most half of lease_ttl_seconds")
        return self


class RuntimeConfig(_Model):
    reply_cache_max: int = Field(
        1000, ge=1, description="Committed replies kept per actor for request_id dedup."
    )
    reply_cache_seconds: float = Field(
        86_400.0, gt=0, description="How long a committed reply is kept for request_id dedup."
    )
    commit_batch_max: int = Field(256, ge=1, description="Commits sent in one Redis pipeline.")
    sync_workers: int = Field(
        16,
        ge=1,
        le=256,
        description="Threads that run plain (non-async) actor methods; async ones run on "
        "the node's event loop.",
    )
    cpu: int | None = Field(
        None,
        ge=0,
        description="Pin the node's threads (its event loop, the plain-def workers, the "
        "due-time queues, the lease heartbeat) to this CPU (Linux); null: the kernel "
        "places them.",
    )
    max_mailbox: int = Field(10_000, ge=1, description="Queued messages per actor before 503.")
    group_commit_max: int = Field(
        32,
        ge=1,
        le=1000,
        description="Queued calls of one actor run one after another and committed together "
        "(each still its own transaction); 1: every call commits on its own.",
    )
    outbox_workers: int = Field(
        64, ge=1, le=4096, description="Outbox attempts in flight at once (tasks on the loop)."
    )
    notify_max: int = Field(
        1000, ge=1, description="Notifications kept per actor for sessions that reconnect."
    )
    max_sessions: int = Field(1000, ge=1, description="WebSocket sessions per node.")
    max_subscriptions: int = Field(
        10_000, ge=1, description="Notification subscriptions per node, over all sessions."
    )


class ActorTypeConfig(_Model):
    class_path: str = Field(alias="class", description="module:ClassName of a troth.CA subclass.")
    state_version: str | None = Field(None, description="Overrides the class's state_version.")
    pulse_seconds: float | None = Field(None, gt=0, description="Makes the actor autonomous.")
    idle_seconds: float = Field(300.0, gt=0, description="Passivate after this long idle.")


class AuthConfig(_Model):
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="Bearer key -> principal. Empty: no auth (loopback)."
    )
    operators: dict[str, Literal["read", "write"]] = Field(
        default_factory=dict,
        description="Principal -> what it may do as an operator (the console, /v1/admin): "
        "read, or write (re-drive, cancel, purge, delete, drain). Without API keys the "
        "loopback caller is a write operator.",
    )

    @model_validator(mode="after")
    def _operators_are_principals(self) -> AuthConfig:
        unknown = set(self.operators) - set(self.api_keys.values())
        if unknown:
            raise ValueError(f"operators {sorted(unknown)} are no principal of api_keys")
        return self

    @field_validator("api_keys")
    @classmethod
    def _principals(cls, keys: dict[str, str]) -> dict[str, str]:
        for key, principal in keys.items():
            if len(key) < 16:
                raise ValueError("API keys must be at least 16 characters")
            if not re.match(r"^[a-z0-9][a-z0-9_]{0,62}$", principal):
                raise ValueError(
                    f"principal {principal!r} must be lowercase letters, digits and _ (no '-': "
                    "it separates the owner in actor ids)"
                )
        return keys


class Quota(_Model):
    actors: int = Field(100_000, ge=0, description="Actors a principal may create.")
    pending_commitments: int = Field(
        100_000, ge=0, description="Commitments a principal may have pending at once."
    )
    events_per_second: int = Field(
        1_000, ge=0, description="Events a principal may POST per second (cluster-wide)."
    )


class QuotaConfig(Quota):
    per_principal: dict[str, Quota] = Field(
        default_factory=dict,
        description="Principal -> the quotas it has other than the defaults above.",
    )

    def of(self, principal: str) -> Quota:
        """The quotas of ``principal``: its own where given, the defaults elsewhere."""
        own = self.per_principal.get(principal)
        if own is None:
            return self
        return Quota(
            **{**self.model_dump(exclude={"per_principal"}), **own.model_dump(exclude_unset=True)}
        )


class MetricsConfig(_Model):
    require_key: bool = Field(
        False,
        description="With API keys, /metrics answers only an operator's key (read is enough).",
    )
    principal_labels: bool = Field(
        False,
        description="Label per-principal metrics (troth_commitments) with the principal's "
        "name; off: summed over principals, so no tenant name reaches the metrics.",
    )


class Config(_Model):
    node: NodeConfig = Field(default_factory=NodeConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    python_path: list[str] = Field(
        default_factory=list, description="Directories (relative to the config) to import from."
    )
    types: dict[str, ActorTypeConfig] = Field(default_factory=dict)
    extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        max_length=100,
        description="module:Class of each troth.extension.Extension every node hosts.",
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: _default_plugins(),
        description="Plugin name -> its settings; each plugin validates its own.",
    )
    base_dir: str = Field(".", exclude=True, description="Set from the config file's location.")

    def resolve_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p


def _strip_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("//")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def parse_config(data: Any, base_dir: str | os.PathLike[str] = ".") -> Config:
    """Validate an already-parsed JSON document; errors name the offending key."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a JSON object")
    data = _strip_comments(data)
    data["base_dir"] = str(Path(base_dir).resolve())
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {problems(exc)}") from exc


def problems(exc: ValidationError, prefix: str = "") -> str:
    """What a validation error says, each problem as ``key.path: message``; never the
    input (a configuration holds secrets)."""
    head = [prefix] if prefix else []
    return "; ".join(
        ".".join([*head, *map(str, err["loc"])]) + f": {err['msg']}" for err in exc.errors()
    )


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load ``path`` (or the empty configuration when ``None``)."""
    if path is None:
        return parse_config({})
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {file}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
    return parse_config(data, base_dir=file.parent)
