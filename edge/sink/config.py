"""The sink's config file (docs/contracts.md, "edge-sink"): pydantic, unknown keys refused with file:line."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.errors import ConfigError
from edge.publish.mqtt import PASSWORD_FILE_ENV, TlsConfig, read_password

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SinkMqttConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "edge"
    group: str | None = Field(
        "sinks",
        description="the shared-subscription group: sinks in one group split the load; null: unshared "
        "subscriptions (one sink; they survive a restart of a broker that does not persist shared ones)",
    )
    client_id: str | None = Field(
        default=None,
        description="stable per sink process, so its session persists; null: edge-sink-{hostname}",
    )
    session_expiry_s: int = Field(3600, ge=1, description="how long the broker keeps a stopped sink's queue")
    keepalive: int = Field(30, ge=5, le=3600)
    receive_maximum: int = Field(2000, ge=1, le=65535, description="unacknowledged messages in flight to us")
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Path | None = None

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not value or any(ch in value for ch in "#+") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a non-empty topic without wildcards or leading/trailing '/'")
        return value

    @field_validator("group", "client_id")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(ch in value for ch in "#+/")):
            raise ValueError("must be non-empty without '/', '+' or '#'")
        return value

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edge-sink-{socket.gethostname()}"


class DatabaseConfig(_Strict):
    url: str = Field(
        "sqlite:///var/lib/edge-sink/predictions.db",
        description="postgresql://user@host:port/db or sqlite:///absolute/path/to/file.db",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must start with postgresql://, postgres:// or sqlite:///")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:///")

    @property
    def sqlite_path(self) -> Path:
        """The file of `sqlite:///var/x.db`: /var/x.db (a file URL: the path after `sqlite://`)."""
        return Path(self.url[len("sqlite://") :])


class WebConfig(_Strict):
    port: int | None = Field(default=None, ge=0, le=65535, description="null: no page; 0 picks a free port")
    addr: str = Field(
        "127.0.0.1", description="loopback by default: the page is read-only but not authenticated"
    )


class MetricsConfig(_Strict):
    port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus /metrics; null: off")
    addr: str = "127.0.0.1"


class BatchConfig(_Strict):
    max_size: int = Field(500, ge=1, le=100_000, description="messages per database transaction")
    max_delay_ms: float = Field(50.0, ge=0, description="wait this long for a batch to fill")


class GapsConfig(_Strict):
    grace_s: float = Field(30.0, ge=0, description="a seq missing this long is a gap")
    interval_s: float = Field(10.0, gt=0, description="how often the gaps table is refreshed")


class SinkConfig(_Strict):
    mqtt: SinkMqttConfig = Field(default_factory=SinkMqttConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    schema_: str = Field("edge", alias="schema", description="the PostgreSQL schema holding the tables")
    web: WebConfig = Field(default_factory=WebConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    gaps: GapsConfig = Field(default_factory=GapsConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _sql_name(cls, value: str) -> str:
        if not _SCHEMA_NAME.fullmatch(value):
            raise ValueError("must be 1-63 of a-z 0-9 _, not starting with a digit")
        return value


def load_sink_config(path: str | Path, environ: dict[str, str] | None = None) -> SinkConfig:
    """Parse and validate; relative TLS and password file paths are relative to the config file."""
    from edge import yamlio

    path = Path(path)
    config = yamlio.load_model(path, SinkConfig)
    base = path.absolute().parent

    def resolve(value: Path) -> Path:
        value = value.expanduser()
        return value if value.is_absolute() else base / value

    updates: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    mqtt_updates: dict[str, Any] = {}
    password_file = env.get(PASSWORD_FILE_ENV) or config.mqtt.password_file
    if password_file:
        mqtt_updates["password_file"] = resolve(Path(password_file))
    if config.mqtt.tls is not None:
        tls = config.mqtt.tls
        mqtt_updates["tls"] = tls.model_copy(
            update={
                name: resolve(value)
                for name in ("ca_file", "cert_file", "key_file")
                if (value := getattr(tls, name)) is not None
            }
        )
    if mqtt_updates:
        updates["mqtt"] = config.mqtt.model_copy(update=mqtt_updates)
    config = config.model_copy(update=updates)
    try:
        read_password(_as_daemon_mqtt(config.mqtt), {k: v for k, v in env.items() if k != PASSWORD_FILE_ENV})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config


def _as_daemon_mqtt(mqtt: SinkMqttConfig) -> Any:
    from edge.publish.mqtt import MqttConfig

    return MqttConfig(password_file=mqtt.password_file, username=mqtt.username)
