"""The daemon's config file (docs/contracts.md, "Daemon config") and the `edge-infer check-config` subcommand.

Unknown keys are errors that name file, line and field (via `edge.yamlio`). Relative paths in the file
are relative to the file's directory, so a config and its package can travel together. Secrets never sit
in the YAML: the MQTT password comes from `password_file` (refused when other users can read it) or the
EDGE_MQTT_PASSWORD / EDGE_MQTT_PASSWORD_FILE environment variables.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.backends import registry
from edge.detect.config import HomeAssistantConfig, SnapshotConfig, TrackingConfig
from edge.errors import BackendError, ConfigError, EdgeError, Finding
from edge.publish.mqtt import PASSWORD_FILE_ENV, MqttConfig, check_device_id, read_password
from edge.publish.requests import PoolConfig, RequestsConfig
from edge.serve_http import HttpConfig
from edge.sources import SourceConfig
from edge.trust import check_secret_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutboxConfig(_Strict):
    enabled: bool = Field(
        default=True,
        description="false: memory only; predictions made while the broker is away are lost",
    )
    path: Path = Path("/var/lib/edge-infer/outbox.db")
    max_bytes: int = Field(default=64 << 20, ge=4096)
    reserve_bytes: int | None = Field(
        default=None,
        ge=0,
        description="disk space held back so a full disk can be recovered from without a restart; "
        "null: 1/8 of the filesystem within 128 KiB..8 MiB, 0: none",
    )


class MetricsConfig(_Strict):
    port: int | None = Field(default=9464, ge=0, le=65535, description="null disables; 0 picks a free port")
    addr: str = "0.0.0.0"


class HealthConfig(_Strict):
    """A port of its own for /healthz/live and /healthz/ready (the metrics port serves them too)."""

    port: int = Field(default=9465, ge=0, le=65535, description="0 picks a free port")
    addr: str = "0.0.0.0"


class BatchingConfig(_Strict):
    """Frames from every source grouped into one backend call (packages with a dynamic batch axis)."""

    max_size: int = Field(default=4, ge=1, le=256, description="items in one backend call at most")
    max_delay_ms: float = Field(
        default=5.0, ge=0, le=1000, description="how long the first item waits for others to join it"
    )


class DaemonConfig(_Strict):
    device_id: str
    profile: str = "auto"
    model: Path = Field(
        description="a package directory or a package .tar (unpacked into its directory); reloads must stay "
        "inside its parent directory"
    )
    source: SourceConfig | None = None
    sources: list[SourceConfig] | None = Field(default=None, min_length=1)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    metrics: MetricsConfig | None = Field(default_factory=MetricsConfig)
    health: HealthConfig | None = Field(default=None, description="null: probes on the metrics port only")
    trusted_keys: list[Path] = Field(default_factory=list, description="ed25519 public key PEM files")
    backend: str | None = Field(default=None, description="force this backend (default: the profile's order)")
    threads: int | None = Field(default=None, ge=1, le=256)
    frame_queue: int = Field(default=4, ge=1, le=1024, description="frames waiting for inference")
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="inference workers, each with its own copy of the model session; threads are split "
        "between them (null: the device profile's `workers`)",
    )
    requests: RequestsConfig = Field(
        default_factory=RequestsConfig, description="inference on request over MQTT ({prefix}/{device}/infer)"
    )
    pool: PoolConfig | None = Field(
        default=None, description="serve {prefix}/pool/{name}/infer with every daemon of the pool (MQTT 5)"
    )
    http: HttpConfig | None = Field(
        default=None, description="Open Inference Protocol (KServe v2 REST) and POST /infer; null: off"
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="detections tracked into objects: track ids, events, zones",
    )
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    batching: BatchingConfig | None = Field(
        default=None, description="null: one frame per backend call (the default for one camera)"
    )
    flush_timeout_s: float = Field(default=5.0, ge=0, description="on stop: time to drain the outbox")
    exit_on_source_end: bool = Field(
        default=True, description="exit 0 once every source is a finished file (loop: false)"
    )

    @field_validator("device_id")
    @classmethod
    def _device_id_is_topic_safe(cls, value: str) -> str:
        return check_device_id(value)

    @field_validator("backend")
    @classmethod
    def _backend_is_registered(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                registry.plugin_for(value)
            except BackendError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> DaemonConfig:
        if self.batching is not None and self.frame_queue < self.batching.max_size:
            raise ValueError(
                f"frame_queue ({self.frame_queue}) must hold at least batching.max_size "
                f"({self.batching.max_size}) frames"
            )
        return self

    @model_validator(mode="after")
    def _one_source_key(self) -> DaemonConfig:
        if self.source is not None and self.sources is not None:
            raise ValueError("give exactly one of `source` or `sources`")
        if self.pool is not None and self.mqtt.protocol != 5:
            raise ValueError("pool needs mqtt.protocol 5 (shared subscriptions)")
        serves = self.requests.enabled or self.http is not None or self.pool is not None
        if self.source is None and self.sources is None and not serves:
            raise ValueError(
                "give `source` or `sources` (or serve on request only: `requests: {enabled: true}`, `pool:` or `http:`)"
            )
        return self

    @property
    def all_sources(self) -> list[Any]:
        if self.sources is not None:
            return list(self.sources)
        return [self.source] if self.source is not None else []

    @property
    def models_dir(self) -> Path:
        """Reload targets must live here: the directory holding the configured package."""
        return self.model.absolute().parent


def _relative_to(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _resolved_path(config_path: Path, field: str, path: Path) -> Path:
    """`path` made absolute against the config file's directory; a path the OS cannot take is refused."""
    text = str(path)
    if "\0" in text:
        raise ConfigError(f"{config_path}: {field}: path contains a NUL byte")
    try:
        os.fsencode(text)
        return _relative_to(config_path.absolute().parent, path)
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{config_path}: {field}: path is not valid text ({exc.reason})") from exc
    except RuntimeError as exc:  # `~user/...` for a user that does not exist
        raise ConfigError(f"{config_path}: {field}: cannot expand '{text}': {exc}") from exc


def _source_next_to(config_path: Path, field: str, source: BaseModel) -> BaseModel:
    """A source whose uri is a relative file path reads the file next to the config (streams, device
    nodes, indexes and stdin are left as they are)."""
    uri = getattr(source, "uri", None)
    if not isinstance(uri, str) or uri == "-" or "://" in uri or Path(uri).expanduser().is_absolute():
        return source
    return source.model_copy(update={"uri": str(_resolved_path(config_path, field, Path(uri)))})


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> DaemonConfig:
    """Parse and validate a config file; relative paths are resolved against the file's directory."""
    from edge import yamlio

    path = Path(path)
    config = yamlio.load_model(path, DaemonConfig)
    updates: dict[str, Any] = {
        "model": _resolved_path(path, "model", config.model),
        "trusted_keys": [
            _resolved_path(path, f"trusted_keys.{index}", key)
            for index, key in enumerate(config.trusted_keys)
        ],
        "outbox": config.outbox.model_copy(
            update={"path": _resolved_path(path, "outbox.path", config.outbox.path)}
        ),
    }
    if config.sources is not None:
        updates["sources"] = [
            _source_next_to(path, f"sources.{index}.uri", source)
            for index, source in enumerate(config.sources)
        ]
    elif config.source is not None:
        updates["source"] = _source_next_to(path, "source.uri", config.source)
    env = os.environ if environ is None else environ
    mqtt_updates: dict[str, Any] = {}
    # The publisher reads the file itself; the environment may point it elsewhere (a systemd credential).
    password_file = env.get(PASSWORD_FILE_ENV) or config.mqtt.password_file
    if password_file:
        mqtt_updates["password_file"] = _resolved_path(path, "mqtt.password_file", Path(password_file))
    tls = config.mqtt.tls
    if tls is not None:
        tls_updates = {
            name: _resolved_path(path, f"mqtt.tls.{name}", value)
            for name in ("ca_file", "cert_file", "key_file")
            if (value := getattr(tls, name)) is not None
        }
        mqtt_updates["tls"] = tls.model_copy(update=tls_updates)
    if mqtt_updates:
        updates["mqtt"] = config.mqtt.model_copy(update=mqtt_updates)
    config = config.model_copy(update=updates)
    try:  # fail now, not at connect; the message names the config file as well as the secret's
        read_password(config.mqtt, {k: v for k, v in env.items() if k != PASSWORD_FILE_ENV})
        if config.mqtt.tls is not None and config.mqtt.tls.key_file is not None:
            check_secret_file(config.mqtt.tls.key_file, "mqtt.tls.key_file")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config


# ---------------------------------------------------------------------------------------------------------
# `edge-infer check-config FILE`


def _writable_dir(path: Path) -> str | None:
    """Why the daemon could not create or write files in directory `path`, or None."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def preflight(config: DaemonConfig, package: bool = True) -> list[Finding]:
    """Everything about a loaded config that can be checked without starting the daemon: sources' files
    and device nodes, key files, the models and outbox directories. What cannot (the broker) is a
    warning."""
    from edge.package import is_archive
    from edge.signing import load_public_key
    from edge.sources.registry import plugins

    found: list[Finding] = []
    field = "sources" if config.sources is not None else "source"
    for index, source in enumerate(config.all_sources):
        where = f"{field}.{index}" if config.sources is not None else field
        check = plugins()[source.type].check
        found += [Finding(f"{where}.{f.where}", f.message, f.fatal) for f in check(source)]
    if package and not (config.model / "manifest.json").is_file() and not is_archive(config.model):
        found.append(Finding("model", f"{config.model}: not a model package (no manifest.json)"))
    if problem := _writable_dir(config.models_dir):
        found.append(Finding("model", f"{problem}: reload and rollback cannot switch packages", False))
    for index, key in enumerate(config.trusted_keys):
        try:
            load_public_key(key)
        except (EdgeError, OSError) as exc:
            found.append(Finding(f"trusted_keys.{index}", str(exc)))
    tls = config.mqtt.tls
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name) if tls is not None else None
        if path is not None and not Path(path).is_file():
            found.append(Finding(f"mqtt.tls.{name}", f"{path}: no such file"))
    if config.outbox.enabled and (problem := _writable_dir(config.outbox.path.parent)):
        found.append(Finding("outbox.path", f"{problem}: the outbox cannot be created"))
    found.append(
        Finding(
            "mqtt",
            f"the broker {config.mqtt.host}:{config.mqtt.port} is not tried here; "
            "`edge-infer doctor --config FILE` tries it with this TLS and these credentials",
            False,
        )
    )
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the daemon's YAML config")
    parser.add_argument(
        "--no-package", action="store_true", help="do not open and verify the model package it names"
    )


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    findings = preflight(config, package=not args.no_package)
    for finding in findings:
        kind = "error" if finding.fatal else "warning"
        print(f"{kind}: {args.config}: {finding.where}: {finding.message}", file=sys.stderr)
    problems = sum(finding.fatal for finding in findings)
    if problems:
        raise ConfigError(f"{args.config}: {problems} problem(s), each named above")
    model_note = str(config.model)
    if not args.no_package:
        from edge.package import load_package, package_dir
        from edge.signing import load_public_key

        keys = [load_public_key(key) for key in config.trusted_keys] or None
        with package_dir(config.model) as root:  # a package .tar is checked from a temporary copy
            package = load_package(root, trusted_keys=keys)
        signed = ", signed" if package.signed else ""
        model_note = f"{package.manifest.name} {package.manifest.version}{signed} at {config.model}"
    from edge.sources.camera import redact

    sources = ", ".join(f"{s.type}:{redact(s.uri)}" for s in config.all_sources)
    metrics = (
        f"metrics :{config.metrics.port}"
        if config.metrics and config.metrics.port is not None
        else "no metrics"
    )
    print(
        f"ok: {args.config}: device {config.device_id}, model {model_note}, sources {sources}, "
        f"mqtt {config.mqtt.host}:{config.mqtt.port}, "
        f"outbox {config.outbox.path if config.outbox.enabled else 'disabled (memory only)'}, {metrics}"
    )
    return 0
