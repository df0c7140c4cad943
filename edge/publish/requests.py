"""Inference on request: `{prefix}/{device}/infer` messages parsed into requests (no MQTT I/O here).

A request is an image (a JPEG/PNG body with MQTT 5 content type `image/jpeg|image/png`, or
`{"image_b64": ...}`), ready tensors (`{"inputs": {name: nested list}}`) or text (`{"text": ...}`,
`{"texts": [...]}`); a stateful model's requests name their sequence (`sequence_id`, `sequence_start`,
`sequence_end`: edge.publish.sequences). The answer goes to the MQTT 5 response topic with the request's correlation data;
an MQTT 3.1.1 client names `reply_to` (and `correlation_id`, echoed back) in the JSON body. A request
nobody can be answered for is dropped and counted; every other bad request is answered with
`{"error": "...", "field": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.arrays import Array
from edge.errors import EdgeError
from edge.jsontypes import JSONObject, JSONValue
from edge.publish.commands import ReplyRoute
from edge.publish.sequences import FIELDS as SEQUENCE_FIELDS
from edge.publish.sequences import SequenceError, SequenceFlags, parse_sequence

IMAGE_TYPES = ("image/jpeg", "image/png")
MAX_TEXTS = 64


class RequestsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="serve {prefix}/{device}/infer")
    max_bytes: int = Field(default=4 << 20, ge=1024, le=256 << 20, description="largest request payload")
    rate_per_s: float = Field(default=20.0, gt=0, description="requests per second per client (reply topic)")
    burst: int = Field(
        default=40, ge=1, description="requests a client may send at once before the rate applies"
    )
    sequence_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="a stateful model's sequence (MQTT and HTTP) nobody continued for this long is closed",
    )
    max_sequences: int = Field(default=1024, ge=1, description="sequences of a stateful model open at once")


@dataclass(frozen=True)
class InferRequest:
    """One parsed request: exactly one of `image` (HxWx3 uint8 BGR), `tensors` or `texts` is set."""

    reply: ReplyRoute
    client: str  # what the rate limit counts against: the reply topic
    correlation_id: JSONValue = None  # MQTT 3.1.1: echoed in the reply body
    image: Array | None = None
    tensors: Mapping[str, JSONValue] | None = None
    texts: list[str] | None = None
    sequence: SequenceFlags | None = None  # a stateful model's sequence this request continues
    received_at: float = field(default_factory=time.time)
    received_mono: float = field(default_factory=time.monotonic)
    # the MQTT acknowledgement, sent once the request is answered: a daemon killed before it answers
    # gets the request again from the broker when it reconnects (its session persists)
    acknowledge: Callable[[], None] = field(default=lambda: None, repr=False)


class RequestRejected(EdgeError):
    """A request that will not be served; `reply` is None when the sender gave nowhere to answer."""

    def __init__(
        self, message: str, field: str, reply: ReplyRoute | None, correlation_id: JSONValue = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.reply = reply
        self.correlation_id = correlation_id

    def body(self) -> bytes:
        answer: JSONObject = {"error": str(self), "field": self.field}
        if self.correlation_id is not None:
            answer["correlation_id"] = self.correlation_id
        return json.dumps(answer, separators=(",", ":")).encode()


def infer_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/infer"


def pool_topic(prefix: str, pool: str) -> str:
    """Where a pool's requests go; members subscribe to it as `$share/{pool}/...`."""
    return f"{prefix}/pool/{pool}/infer"


_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PoolConfig(BaseModel):
    """Daemons sharing `name` serve `{prefix}/pool/{name}/infer` together (MQTT 5 shared subscription)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 of A-Z a-z 0-9 . _ - (a topic level and the share name)")

    @field_validator("name")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not _POOL_NAME.fullmatch(value):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 . _ - (it becomes a topic level and a share name)")
        return value


def parse_infer_request(
    topic: str,
    payload: bytes,
    *,
    content_type: str | None,
    response_topic: str | None,
    correlation_data: bytes | None,
    max_bytes: int,
) -> InferRequest:
    route = ReplyRoute(response_topic, correlation_data) if response_topic else None
    if content_type in IMAGE_TYPES:
        if route is None:
            raise RequestRejected(
                f"{topic}: an image body needs an MQTT 5 response topic", "response_topic", None
            )
        _check_size(topic, payload, max_bytes, route, None)
        return InferRequest(route, route.topic, image=decode_image(payload, topic, "payload", route, None))
    body = _json_body(topic, payload, max_bytes, route)
    correlation_id = body.get("correlation_id")
    if route is None:
        reply_to = body.get("reply_to")
        if not isinstance(reply_to, str) or not reply_to or any(c in reply_to for c in "+#\0"):
            raise RequestRejected(
                f"{topic}: no response topic: MQTT 5 requests set one, 3.1.1 requests put `reply_to` in the body",
                "reply_to",
                None,
            )
        route = ReplyRoute(reply_to)
    known = {"image_b64", "inputs", "text", "texts", "reply_to", "correlation_id", *SEQUENCE_FIELDS}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestRejected(f"{topic}: unknown field '{unknown[0]}'", unknown[0], route, correlation_id)
    try:
        sequence = parse_sequence(body)
    except SequenceError as exc:
        raise RequestRejected(f"{topic}: {exc}", exc.field, route, correlation_id) from None
    given = [key for key in ("image_b64", "inputs", "text", "texts") if key in body]
    if len(given) != 1:
        raise RequestRejected(
            f"{topic}: give exactly one of image_b64, inputs, text, texts (got {', '.join(given) or 'none'})",
            given[1] if len(given) > 1 else "image_b64",
            route,
            correlation_id,
        )
    kind = given[0]
    value = body[kind]
    if kind == "image_b64":
        if not isinstance(value, str):
            raise RequestRejected(f"{topic}: image_b64 must be a base64 string", kind, route, correlation_id)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestRejected(
                f"{topic}: image_b64 is not base64: {exc}", kind, route, correlation_id
            ) from exc
        image = decode_image(raw, topic, kind, route, correlation_id)
        return InferRequest(route, route.topic, correlation_id, image=image, sequence=sequence)
    if kind == "inputs":
        if not isinstance(value, dict) or not value:
            raise RequestRejected(
                f"{topic}: inputs must be an object of input name -> nested list", kind, route, correlation_id
            )
        return InferRequest(route, route.topic, correlation_id, tensors=value, sequence=sequence)
    texts = [value] if kind == "text" else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestRejected(
            f"{topic}: {kind} must be a string or a list of strings", kind, route, correlation_id
        )
    if len(texts) > MAX_TEXTS:
        raise RequestRejected(f"{topic}: at most {MAX_TEXTS} texts a request", kind, route, correlation_id)
    lines = [str(text) for text in texts]
    return InferRequest(route, route.topic, correlation_id, texts=lines, sequence=sequence)


def _check_size(
    topic: str, payload: bytes, max_bytes: int, route: ReplyRoute | None, correlation_id: JSONValue
) -> None:
    if len(payload) > max_bytes:
        raise RequestRejected(
            f"{topic}: request is {len(payload)} bytes, limit is {max_bytes} (requests.max_bytes)",
            "payload",
            route,
            correlation_id,
        )


def _json_body(topic: str, payload: bytes, max_bytes: int, route: ReplyRoute | None) -> dict[str, JSONValue]:
    # too large to parse: only an MQTT 5 sender (a response topic) can be told
    _check_size(topic, payload, max_bytes, route, None)
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # ValueError covers UnicodeDecodeError
        raise RequestRejected(
            f"{topic}: payload is neither JSON nor a typed image: {exc}", "payload", route
        ) from exc
    if not isinstance(body, dict):
        raise RequestRejected(f"{topic}: payload must be a JSON object", "payload", route)
    return body


def decode_image(
    raw: bytes, topic: str, field_name: str, route: ReplyRoute | None, correlation_id: JSONValue
) -> Array:
    """JPEG/PNG bytes -> HxWx3 uint8 BGR (what OpenCV sources deliver)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if image is None:
        raise RequestRejected(
            f"{topic}: {field_name} is not a JPEG or PNG image OpenCV can decode",
            field_name,
            route,
            correlation_id,
        )
    return np.asarray(image)


def tensors_for(
    values: Mapping[str, JSONValue],
    specs: Mapping[str, tuple[list[int | str], str]],
    topic: str,
    request: InferRequest,
    optional: frozenset[str] = frozenset(),
) -> dict[str, Array]:
    """`{"inputs": {...}}` as arrays of the model's dtypes; names and shapes are checked by the backend.
    `optional` inputs (constants, recurrent state) are filled in by the session when not given."""
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise RequestRejected(
            f"{topic}: inputs.{unknown[0]} is not a model input (inputs: {', '.join(sorted(specs))})",
            f"inputs.{unknown[0]}",
            request.reply,
            request.correlation_id,
        )
    arrays: dict[str, Array] = {}
    for name, (_, dtype) in specs.items():
        if name not in values:
            if name in optional:
                continue
            raise RequestRejected(
                f"{topic}: inputs.{name} is missing", f"inputs.{name}", request.reply, request.correlation_id
            )
        try:
            arrays[name] = np.asarray(values[name], dtype=np.dtype(dtype))
        except (ValueError, TypeError) as exc:
            raise RequestRejected(
                f"{topic}: inputs.{name} is not a nested list of {dtype}: {exc}",
                f"inputs.{name}",
                request.reply,
                request.correlation_id,
            ) from exc
    return arrays


class RateLimiter:
    """A token bucket per client: `burst` requests at once, then `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 4096) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, since = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate)
            if len(self._buckets) >= self.max_clients and client not in self._buckets:
                self._buckets.clear()  # a flood of reply topics must not grow memory without bound
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return False
            self._buckets[client] = (tokens - 1.0, now)
            return True
