"""Inference on request over HTTP (opt-in `http:`): the Open Inference Protocol (KServe v2 REST) and a
plain `POST /infer` with an image body, served by aiohttp on a thread of its own.

    GET  /v2                                server metadata
    GET  /v2/health/live | /v2/health/ready 200 or 503 (the daemon's own liveness/readiness)
    GET  /v2/models/{name}[/versions/{v}]   model metadata: inputs/outputs with datatype and shape
    GET  /v2/models/{name}/ready            200 or 503
    POST /v2/models/{name}[/versions/{v}]/infer   tensors in, the model's raw output tensors out
    POST /infer                             a JPEG/PNG body in, the prediction payload out

Every request goes through the daemon's queue (batched with camera frames, stored in the outbox like any
prediction). Off loopback a bearer token is required (`token_file`); the health routes stay open for
probes. aiohttp is imported only when the server starts (`pip install edge-runtime[http]`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.arrays import Array
from edge.errors import ConfigError
from edge.jsontypes import JSONObject, JSONValue
from edge.publish.requests import RequestRejected
from edge.publish.sequences import SequenceError, SequenceFlags, parse_sequence

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

    from edge.health import Probe

    _Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 30.0
# Open Inference Protocol datatypes <-> numpy
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip
NUMPY_TO_DATATYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    addr: str = Field(default="127.0.0.1", description="off loopback a token_file is required")
    token_file: Path | None = Field(default=None, description="a file holding the bearer token")
    max_bytes: int = Field(default=16 << 20, ge=1024, description="largest request body")

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.token_file is None and not _is_loopback(self.addr):
            raise ValueError(
                f"addr {self.addr} is not loopback: give token_file (requests must be authenticated)"
            )
        return self


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    from edge.trust import check_secret_file

    check_secret_file(path, "http.token_file")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ConfigError(f"http.token_file: {path}: the token must be at least 16 characters")
    return token


class InferenceService(Protocol):
    """What the HTTP server asks of the daemon."""

    def liveness(self) -> Probe: ...

    def readiness(self) -> Probe: ...

    def model_metadata(self) -> JSONObject: ...  # name, versions, platform, inputs, outputs

    def submit_request(
        self,
        data: Array | Mapping[str, Array],
        answer: FutureAnswer,
        client: str,
        uri: str,
        tag: JSONObject | None = None,
        received_mono: float | None = None,
        sequence: SequenceFlags | None = None,
    ) -> None: ...  # queues it (blocks while the queue is full); RequestRejected on a rate limit


class FutureAnswer:
    """The worker's answer to one HTTP request, waited for by the handler."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[tuple[JSONObject, list[Array]]] = concurrent.futures.Future()

    def deliver(self, payload: JSONObject, outputs: list[Array]) -> None:
        self.future.set_result((payload, outputs))

    def fail(self, message: str, field: str) -> None:
        self.future.set_exception(RequestRejected(message, field, None))


class HttpServer:
    """aiohttp on its own thread and event loop; `close()` stops it from any thread."""

    def __init__(self, config: HttpConfig, service: InferenceService) -> None:
        self.config = config
        self.service = service
        self.token = read_token(config.token_file) if config.token_file is not None else None
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="edge-http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:
            raise ConfigError("http: needs aiohttp (pip install 'edge-runtime[http]')") from exc
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise ConfigError(f"http: cannot listen on {self.config.addr}:{self.config.port}: {self._error}")
        log.info("http: Open Inference Protocol on http://%s:%d/v2", self.config.addr, self.port)

    def close(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    # -- the server thread ------------------------------------------------------------------------------

    def _serve(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start(); the daemon refuses to run without it
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        import asyncio

        from aiohttp import web

        self._stopping = asyncio.Event()

        @web.middleware
        async def authenticated(request: web.Request, handler: _Handler) -> web.StreamResponse:
            return await self._check_token(request, handler)

        app = web.Application(client_max_size=self.config.max_bytes, middlewares=[authenticated])
        app.add_routes(
            [
                web.get("/v2", self._server_metadata),
                web.get("/v2/health/live", self._live),
                web.get("/v2/health/ready", self._ready_probe),
                web.get("/v2/models/{name}", self._model_metadata),
                web.get("/v2/models/{name}/versions/{version}", self._model_metadata),
                web.get("/v2/models/{name}/ready", self._model_ready),
                web.post("/v2/models/{name}/infer", self._infer_tensors),
                web.post("/v2/models/{name}/versions/{version}/infer", self._infer_tensors),
                web.post("/infer", self._infer_image),
            ]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.addr, self.config.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    @staticmethod
    def _json(body: JSONObject, status: int = 200) -> web.Response:
        from aiohttp import web

        return web.Response(
            body=json.dumps(body, separators=(",", ":")).encode(),
            status=status,
            content_type="application/json",
        )

    async def _check_token(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        from aiohttp import web

        if self.token is not None and not request.path.startswith("/v2/health"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return self._json({"error": "missing or wrong bearer token (Authorization header)"}, 401)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._json({"error": f"body over {self.config.max_bytes} bytes (http.max_bytes)"}, 413)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        from importlib.metadata import PackageNotFoundError, version

        try:
            edge_version = version("edge-runtime")
        except PackageNotFoundError:
            edge_version = "unknown"
        return self._json({"name": "edge-infer", "version": edge_version, "extensions": []})

    async def _live(self, request: web.Request) -> web.Response:
        probe = self.service.liveness()
        return self._json(
            {"live": probe.ok, **({"reason": probe.reason} if probe.reason else {})}, 200 if probe.ok else 503
        )

    async def _ready_probe(self, request: web.Request) -> web.Response:
        probe = self.service.readiness()
        return self._json(
            {"ready": probe.ok, **({"reason": probe.reason} if probe.reason else {})},
            200 if probe.ok else 503,
        )

    def _model(self, request: web.Request) -> tuple[JSONObject | None, web.Response | None]:
        metadata = self.service.model_metadata()
        name = request.match_info["name"]
        version = request.match_info.get("version")
        versions = metadata.get("versions")
        if name != metadata["name"] or (
            version is not None and isinstance(versions, list) and version not in versions
        ):
            wanted = f"{name}" + (f" version {version}" if version else "")
            return None, self._json(
                {"error": f"model '{wanted}' is not served here (serving: {metadata['name']})"}, 404
            )
        return metadata, None

    async def _model_metadata(self, request: web.Request) -> web.Response:
        metadata, missing = self._model(request)
        return missing or self._json(metadata or {})

    async def _model_ready(self, request: web.Request) -> web.Response:
        metadata, missing = self._model(request)
        if missing is not None:
            return missing
        probe = self.service.readiness()
        return self._json(
            {"name": metadata["name"] if metadata else "", "ready": probe.ok}, 200 if probe.ok else 503
        )

    async def _infer_tensors(self, request: web.Request) -> web.Response:
        metadata, missing = self._model(request)
        if missing is not None or metadata is None:
            return missing or self._json({"error": "no model"}, 404)
        try:
            body = await request.json()
        except ValueError as exc:
            return self._json({"error": f"body is not JSON: {exc}"}, 400)
        try:
            feeds, request_id = parse_tensors(body, metadata)
            sequence = parse_parameters(body)
        except RequestRejected as exc:
            return self._json({"error": str(exc), "field": exc.field}, 400)
        answered = await self._submit(request, feeds, "http:v2", sequence)
        if not isinstance(answered, tuple):
            return answered
        payload, outputs = answered
        output_specs = metadata.get("outputs")
        names = (
            [str(o["name"]) for o in output_specs if isinstance(o, dict)]
            if isinstance(output_specs, list)
            else []
        )
        wanted = (
            {o.get("name") for o in body.get("outputs", []) if isinstance(o, dict)}
            if isinstance(body, dict)
            else set()
        )
        tensors: list[JSONValue] = [
            _tensor(name, array)
            for name, array in zip(names, outputs, strict=False)
            if not wanted or name in wanted
        ]
        model = payload.get("model")
        answer: JSONObject = {
            "model_name": metadata["name"],
            "model_version": model.get("version") if isinstance(model, dict) else "",
            "outputs": tensors,
            "parameters": {"seq": payload.get("seq"), "boot_id": payload.get("boot_id")},
        }
        if request_id is not None:
            answer["id"] = request_id
        return self._json(answer)

    async def _infer_image(self, request: web.Request) -> web.Response:
        from edge.publish.requests import IMAGE_TYPES, decode_image

        if request.content_type not in IMAGE_TYPES:
            return self._json(
                {"error": f"Content-Type must be one of {', '.join(IMAGE_TYPES)}", "field": "content_type"},
                415,
            )
        raw = await request.read()
        try:
            image = decode_image(raw, "/infer", "body", None, None)
        except RequestRejected as exc:
            return self._json({"error": str(exc), "field": exc.field}, 400)
        answered = await self._submit(request, image, "http:infer")
        if not isinstance(answered, tuple):
            return answered
        return self._json(answered[0])

    async def _submit(
        self,
        request: web.Request,
        data: Array | Mapping[str, Array],
        uri: str,
        sequence: SequenceFlags | None = None,
    ) -> tuple[JSONObject, list[Array]] | web.Response:
        import asyncio

        answer = FutureAnswer()
        client = request.remote or "?"
        loop = asyncio.get_running_loop()
        submit = functools.partial(
            self.service.submit_request, data, answer, client, uri, None, None, sequence
        )
        try:
            # the queue may make it wait for room: never on the event loop
            await loop.run_in_executor(None, submit)
            return await asyncio.wait_for(asyncio.wrap_future(answer.future), ANSWER_TIMEOUT_S)
        except RequestRejected as exc:
            status = 429 if "rate limit" in str(exc) else 400
            return self._json({"error": str(exc), "field": exc.field}, status)
        except TimeoutError:
            return self._json({"error": f"no answer within {ANSWER_TIMEOUT_S:g} s"}, 504)


def parse_tensors(body: JSONValue, metadata: JSONObject) -> tuple[dict[str, Array], JSONValue]:
    """An Open Inference Protocol request body -> feeds by input name (datatype and shape checked)."""
    if not isinstance(body, dict):
        raise RequestRejected("body must be a JSON object", "body", None)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestRejected("inputs must be a non-empty list of tensors", "inputs", None)
    specs = {str(s["name"]): s for s in metadata.get("inputs", []) if isinstance(s, dict)}  # type: ignore[union-attr]
    feeds: dict[str, Array] = {}
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise RequestRejected(f"{where} must be an object", where, None)
        name, shape, datatype, data = (tensor.get(k) for k in ("name", "shape", "datatype", "data"))
        if name not in specs:
            raise RequestRejected(
                f"{where}.name {name!r} is not a model input ({', '.join(specs)})", f"{where}.name", None
            )
        if datatype not in DATATYPES or datatype != specs[str(name)]["datatype"]:
            raise RequestRejected(
                f"{where}.datatype {datatype!r}: the model takes {specs[str(name)]['datatype']}",
                f"{where}.datatype",
                None,
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RequestRejected(f"{where}.shape must be a list of sizes", f"{where}.shape", None)
        try:
            array = np.asarray(data, dtype=np.dtype(DATATYPES[str(datatype)]))
            feeds[str(name)] = array.reshape([int(d) for d in shape if isinstance(d, int)])
        except (ValueError, TypeError) as exc:
            raise RequestRejected(
                f"{where}.data does not fill shape {shape}: {exc}", f"{where}.data", None
            ) from exc
    return feeds, body.get("id")


def parse_parameters(body: JSONValue) -> SequenceFlags | None:
    """The request's `parameters`: Triton's sequence fields (`sequence_id`, `sequence_start`,
    `sequence_end`) for a stateful model; other parameters are the caller's and left alone."""
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise RequestRejected("parameters must be an object", "parameters", None)
    try:
        return parse_sequence(parameters, "parameters.")
    except SequenceError as exc:
        raise RequestRejected(str(exc), exc.field, None) from None


def _tensor(name: str, array: Array) -> JSONObject:
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.name, "FP32")
    flat = array.astype(np.dtype(DATATYPES[datatype]), copy=False).reshape(-1)
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": flat.tolist()}


def tensor_metadata(name: str, shape: list[int | str], dtype: str) -> JSONObject:
    return {
        "name": name,
        "datatype": NUMPY_TO_DATATYPE.get(np.dtype(dtype).name, "FP32"),
        "shape": [d if isinstance(d, int) and d > 0 else -1 for d in shape],
    }
