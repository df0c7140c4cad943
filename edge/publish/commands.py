"""Incoming `{prefix}/{device}/cmd/{name}` messages: validation and reply routing (no MQTT I/O here).

The publisher parses each message with `parse_command`; a `CommandRejected` carries where the error reply
goes, so a bad command is answered and nothing else happens. Handlers are the daemon's; `dispatch`
runs one and turns its result or exception into a reply body.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edge.errors import EdgeError

COMMAND_NAMES = ("reload", "rollback", "selfcheck", "stats")
MAX_COMMAND_BYTES = 64 * 1024

CommandHandler = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class ReplyRoute:
    """Where a reply goes: the MQTT 5 response topic (with its correlation data) or `cmd/{name}/reply`."""

    topic: str
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Command:
    name: str
    args: dict[str, Any]
    reply: ReplyRoute
    request_id: Any = None  # echoed back when the sender put an "id" in the JSON object


class CommandRejected(EdgeError):
    """A command that must not run; `reply` says where the error answer goes."""

    def __init__(self, message: str, name: str, reply: ReplyRoute, request_id: Any = None) -> None:
        super().__init__(message)
        self.name = name
        self.reply = reply
        self.request_id = request_id


def command_topic_filter(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/cmd/+"


def reply_route(topic: str, response_topic: str | None, correlation_data: bytes | None) -> ReplyRoute:
    """MQTT 5 requests name their response topic; otherwise (3.1.1) the reply goes to `{topic}/reply`."""
    if response_topic:
        return ReplyRoute(response_topic, correlation_data)
    return ReplyRoute(f"{topic}/reply", correlation_data)


def parse_command(
    topic: str,
    payload: bytes,
    *,
    retained: bool = False,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    max_bytes: int = MAX_COMMAND_BYTES,
    known: tuple[str, ...] = COMMAND_NAMES,
) -> Command | None:
    """Validate one command message; raises `CommandRejected` naming the topic and the reason.

    Returns None for an empty payload: that is how a retained message is cleared, and clearing a stale
    retained command must not run it. Anything else must be a JSON object (`{}` for no arguments).
    """
    name = topic.rsplit("/", 1)[-1]
    route = reply_route(topic, response_topic, correlation_data)
    if retained:
        raise CommandRejected(
            f"{topic}: retained command ignored (publish commands without retain)", name, route
        )
    if len(payload) > max_bytes:
        raise CommandRejected(f"{topic}: command is {len(payload)} bytes, limit is {max_bytes}", name, route)
    if not payload:
        return None
    try:
        body = json.loads(payload, parse_constant=_refuse_constant)
    except ValueError as exc:  # also UnicodeDecodeError
        raise CommandRejected(f"{topic}: payload is not valid JSON: {exc}", name, route) from exc
    except RecursionError as exc:
        raise CommandRejected(f"{topic}: payload is not valid JSON: nested too deeply", name, route) from exc
    if not isinstance(body, dict):
        raise CommandRejected(
            f"{topic}: payload must be a JSON object, got {type(body).__name__}", name, route
        )
    request_id = body.pop("id", None)
    if name not in known:
        raise CommandRejected(
            f"{topic}: unknown command {name!r} (known: {', '.join(known)})", name, route, request_id
        )
    return Command(name=name, args=body, reply=route, request_id=request_id)


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; echoed back in a reply they would make it invalid JSON.
    raise ValueError(f"{name} is not JSON")


def reply_body(
    name: str, *, ok: bool, result: Any = None, error: str | None = None, request_id: Any = None
) -> bytes:
    body: dict[str, Any] = {"command": name, "ok": ok}
    if request_id is not None:
        body["id"] = request_id
    if ok:
        body["result"] = result if result is not None else {}
    else:
        body["error"] = error or "failed"
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def rejection_reply(exc: CommandRejected) -> bytes:
    return reply_body(exc.name, ok=False, error=str(exc), request_id=exc.request_id)


def dispatch(command: Command, handlers: Mapping[str, CommandHandler]) -> bytes:
    """Run the handler for `command`; its exception becomes an error reply, never propagates."""
    handler = handlers.get(command.name)
    if handler is None:
        return reply_body(
            command.name,
            ok=False,
            error=f"command {command.name!r} has no handler",
            request_id=command.request_id,
        )
    try:
        result = handler(command.args)
    except Exception as exc:  # a handler bug must not take down the MQTT loop
        message = str(exc) or type(exc).__name__
        return reply_body(command.name, ok=False, error=message, request_id=command.request_id)
    return reply_body(command.name, ok=True, result=result, request_id=command.request_id)
