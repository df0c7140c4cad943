"""A model package ready to serve, and the public Python API on top of it.

`ModelSession` is what the daemon serves: a verified package, the backend that passed its golden check,
the pre-processing built from the manifest's input spec and the task decoder the manifest names.
`open_model()` wraps one for a Python caller, with no MQTT and no daemon:

    from edge import open_model
    with open_model("pkg") as model:
        result = model.infer(rgb_frame)      # the prediction payload's `result` object

Frames from OpenCV sources are BGR (the daemon passes them as they come); `Model.infer` takes RGB, the
order a numpy image from PIL, scikit-image or matplotlib has.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from edge.arrays import Array
from edge.backends import EventCallback, LoadedModel, load_model
from edge.backends.golden import GoldenReport
from edge.errors import BackendError, EdgeError, PackageError
from edge.package import Package, TensorSpec, extract_archive, load_package
from edge.processing.preprocess import ImagePreprocessor, Letterbox
from edge.processing.text import TextPreprocessor
from edge.profiles import DeviceProfile, resolve_profile
from edge.tasks import make_decoder
from edge.tasks.base import Decoder, Result

log = logging.getLogger(__name__)

ColorOrder = Literal["RGB", "BGR"]
ModelInput = Array | Mapping[str, Array] | str


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds spent in each stage of one inference (the payload's `latency_ms`)."""

    preprocess: float
    inference: float
    postprocess: float

    def to_dict(self) -> dict[str, float]:
        return {"preprocess": self.preprocess, "inference": self.inference, "postprocess": self.postprocess}


class SensorPreprocessor:
    """(window, channels) float32 windows -> the model's input tensor (same element count, batch of one)."""

    def __init__(self, spec: TensorSpec):
        self.spec = spec
        self.shape = [int(d) if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        self.dtype = np.dtype(spec.dtype)

    def __call__(self, data: Array) -> Array:
        if self.spec.layout == "NCT" and data.ndim == 2:
            data = data.T
        if int(np.prod(self.shape)) != data.size:
            raise ValueError(
                f"a window of shape {data.shape} does not fit input '{self.spec.name}' {self.spec.shape}"
            )
        return np.ascontiguousarray(data.reshape(self.shape).astype(self.dtype, copy=False))


def _concrete(shape: Sequence[int | str]) -> list[int]:
    """A tensor shape with symbolic dimensions as 1 (one stream, batch of one)."""
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def as_text(data: Array | str) -> str | None:
    """The text in a str or a 0-d object array holding one (a text source's frame), else None."""
    if isinstance(data, str):
        return data
    if isinstance(data, np.ndarray) and data.ndim == 0 and data.dtype == object:
        item = data.item()
        if isinstance(item, str):
            return item
    return None


@dataclass
class ModelSession:
    """A loaded, verified, self-checked package with its pre- and post-processing."""

    package: Package
    loaded: LoadedModel
    decoder: Decoder
    image_pre: ImagePreprocessor | None
    sensor_pre: SensorPreprocessor | None
    text_pre: TextPreprocessor | None = None
    loaded_at: float = field(default_factory=time.time)
    # every loaded copy of the backend (`loaded` first): one per daemon worker, each run takes a free one
    replicas: queue.Queue[LoadedModel] = field(default_factory=queue.Queue, repr=False)
    _all: list[LoadedModel] = field(default_factory=list, repr=False)
    # recurrent state per stream (a source's name): the outputs the manifest's `state` links carry
    _states: dict[str, dict[str, Array]] = field(default_factory=dict, repr=False)
    _state_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.add_replica(self.loaded)

    def add_replica(self, loaded: LoadedModel) -> None:
        self._all.append(loaded)
        self.replicas.put(loaded)

    @property
    def replica_count(self) -> int:
        return len(self._all)

    @contextlib.contextmanager
    def _backend(self) -> Iterator[LoadedModel]:
        loaded = self.replicas.get()  # as many callers at once as there are copies
        try:
            yield loaded
        finally:
            self.replicas.put(loaded)

    @property
    def info(self) -> dict[str, str]:
        """Name, version and artifact sha256: the provenance every prediction carries."""
        manifest = self.package.manifest
        return {"name": manifest.name, "version": manifest.version, "sha256": self.loaded.artifact.sha256}

    @property
    def backend_name(self) -> str:
        return self.loaded.backend_name

    @property
    def provider(self) -> str:
        return self.loaded.provider

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self.loaded.input_specs

    @property
    def golden(self) -> GoldenReport | None:
        """The self-check run at load time (None: the package has no golden data)."""
        return self.loaded.golden

    @property
    def data_spec(self) -> TensorSpec:
        """The input a frame, window or text becomes (the others are constants or recurrent state)."""
        fed = self._fed_names
        return next(spec for spec in self.input_specs if spec.name not in fed)

    @property
    def _fed_names(self) -> set[str]:
        manifest = self.package.manifest
        return {c.name for c in manifest.constants} | {link.input for link in manifest.state}

    @property
    def stateful(self) -> bool:
        return bool(self.package.manifest.state)

    def reset_state(self, stream: str | None = None) -> None:
        """Forget the recurrent state of one stream (None: of every stream); its next run starts at zeros.
        The daemon calls it when a source restarts; a reload builds a new session, so state starts over."""
        with self._state_lock:
            if stream is None:
                self._states.clear()
            else:
                self._states.pop(stream, None)

    def _with_fed_inputs(self, feeds: dict[str, Array], stream: str) -> dict[str, Array]:
        """The data feeds plus every constant and the stream's state (zeros at its start)."""
        manifest = self.package.manifest
        specs = {spec.name: spec for spec in self.input_specs}
        with self._state_lock:
            carried = self._states.get(stream, {})
        for const in manifest.constants:
            spec = specs[const.name]
            feeds.setdefault(const.name, np.full(_concrete(spec.shape), const.value, np.dtype(spec.dtype)))
        for link in manifest.state:
            spec = specs[link.input]
            if link.input not in feeds:
                state = carried.get(link.input)
                feeds[link.input] = (
                    state if state is not None else np.zeros(_concrete(spec.shape), np.dtype(spec.dtype))
                )
        return feeds

    def _keep_state(self, outputs: list[Array], stream: str) -> None:
        links = self.package.manifest.state
        if not links:
            return
        position = {spec.name: i for i, spec in enumerate(self.loaded.output_specs)}
        carried = {link.input: outputs[position[link.output]] for link in links}
        with self._state_lock:
            self._states[stream] = carried

    def infer(
        self, data: Array | str, color: ColorOrder = "BGR", stream: str = ""
    ) -> tuple[Result, StageTimings]:
        """One frame, sensor window or text through the whole model: the payload's `result` and the
        timings. A text source's frame is a 0-d object array holding the line (`edge.sources.text`).
        `stream` names whose recurrent state this run continues (a source's name)."""
        t0 = time.perf_counter()
        feeds, geometry = self._feeds_for(data, color)
        feeds = self._with_fed_inputs(feeds, stream)
        t1 = time.perf_counter()
        with self._backend() as backend:
            outputs = backend.run(feeds)
        self._keep_state(outputs, stream)
        t2 = time.perf_counter()
        result = self.decoder(outputs, geometry)
        t3 = time.perf_counter()
        return result, StageTimings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    @property
    def batchable(self) -> bool:
        """Whether one backend call may carry several inputs: every input's first dimension is symbolic
        (a package exported with a dynamic batch axis)."""
        return all(not (isinstance(spec.shape[0], int) and spec.shape[0] > 0) for spec in self.input_specs)

    def infer_batch(
        self, batch: Sequence[Array], color: ColorOrder = "BGR"
    ) -> list[tuple[Result, StageTimings]]:
        """Several frames or windows in one backend call (when the package has a dynamic batch axis;
        otherwise one call each): a result per item, in order, each equal to what `infer` gives it.
        Every item's timings carry the whole call's inference time: that is what each one waited."""
        if (
            len(batch) == 1
            or not self.batchable
            or self.stateful
            or any(as_text(data) is not None for data in batch)
        ):
            # texts are padded to their own length bucket: one call each
            return [self.infer(data, color) for data in batch]
        t0 = time.perf_counter()
        prepared = [self._feeds_for(data, color) for data in batch]
        feeds = {name: np.concatenate([f[name] for f, _ in prepared]) for name in prepared[0][0]}
        t1 = time.perf_counter()
        with self._backend() as backend:
            outputs = backend.run(feeds)
        t2 = time.perf_counter()
        if any(out.ndim == 0 or out.shape[0] != len(batch) for out in outputs):
            raise BackendError(
                f"batched run of {len(batch)} gave outputs of shapes {[list(o.shape) for o in outputs]}: "
                "the model's batch axis is not its outputs' first dimension"
            )
        results = []
        pre_ms, infer_ms = (t1 - t0) * 1e3 / len(batch), (t2 - t1) * 1e3
        for index, (_, geometry) in enumerate(prepared):
            t3 = time.perf_counter()
            result = self.decoder([out[index : index + 1] for out in outputs], geometry)
            results.append((result, StageTimings(pre_ms, infer_ms, (time.perf_counter() - t3) * 1e3)))
        return results

    def infer_feeds(self, feeds: Mapping[str, Array], stream: str = "") -> tuple[Result, StageTimings]:
        """Ready tensors by input name (multi-input and sensor models): no pre-processing. Constants and
        state not given are filled in (state carried per `stream`)."""
        _, result, timings = self.run_feeds(feeds, stream)
        return result, timings

    def run_feeds(
        self, feeds: Mapping[str, Array], stream: str = ""
    ) -> tuple[list[Array], Result, StageTimings]:
        """`infer_feeds`, keeping the model's raw outputs too (an Open Inference Protocol answer)."""
        t1 = time.perf_counter()
        full = self._with_fed_inputs(dict(feeds), stream)
        with self._backend() as backend:
            outputs = backend.run(full)
        self._keep_state(outputs, stream)
        t2 = time.perf_counter()
        result = self.decoder(outputs, None)
        return outputs, result, StageTimings(0.0, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)

    def _feeds_for(self, data: Array | str, color: ColorOrder) -> tuple[dict[str, Array], Letterbox | None]:
        if isinstance(data, str):
            return self._text_feeds(data), None
        text = as_text(data)
        if text is not None:
            return self._text_feeds(text), None
        name = self.data_spec.name
        if data.dtype == np.uint8 and data.ndim in (2, 3) and self.image_pre is not None:
            # The pre-processor takes OpenCV's BGR; a gray frame has no order to swap.
            frame = data[..., ::-1] if color == "RGB" and data.ndim == 3 and data.shape[2] == 3 else data
            tensor, geometry = self.image_pre(frame)
            return {name: tensor}, geometry
        if self.sensor_pre is None:
            raise ValueError(f"frame of shape {data.shape} does not fit the model's input")
        return {name: self.sensor_pre(data)}, None

    def _text_feeds(self, text: str) -> dict[str, Array]:
        if self.text_pre is None:
            raise ValueError("a text input, but the model has no tokenizer (its package has no `text`)")
        return self.text_pre(text)

    def warm_up(self) -> None:
        """The first run allocates arenas and picks kernels: do it before READY, not on a frame."""
        for _ in range(self.replica_count):  # each run takes the copy that has waited longest
            if self.text_pre is not None:
                for length in self.text_pre.lengths:  # every bucket: a first text of each length is not slow
                    with self._backend() as backend:
                        backend.run(self._with_fed_inputs(self.text_pre.encode("warm up", length=length), ""))
            elif self.image_pre is not None:
                self.infer(np.zeros((*self.image_pre.example_hw, 3), np.uint8))
            elif self.sensor_pre is not None:
                spec = self.data_spec
                # a stream of its own, forgotten after: warm-up must not leave state behind
                feeds = {spec.name: np.zeros(self.sensor_pre.shape, self.sensor_pre.dtype)}
                with self._backend() as backend:
                    backend.run(self._with_fed_inputs(feeds, "\0warm-up"))
        self.reset_state()

    def close(self) -> None:
        for loaded in self._all:
            try:
                loaded.close()
            except Exception:  # closing must never take the daemon down
                log.exception("closing model %s", self.info)


def open_session(
    package: Package,
    profile: DeviceProfile,
    *,
    backend: str | None = None,
    threads: int | None = None,
    on_event: EventCallback | None = None,
    cache_dir: Path | None = None,
    replicas: int = 1,
) -> ModelSession:
    """Load a verified package, golden-check and warm it up. Raises EdgeError subclasses.
    `cache_dir`: where backends keep optimized graphs and engines (default: `EDGE_CACHE`/engines).
    `replicas`: copies of the backend session, for as many workers running at once (each golden-checked)."""
    loaded = load_model(
        package, profile, backend=backend, threads=threads, on_event=on_event, cache_dir=cache_dir
    )
    extra: list[LoadedModel] = []
    try:
        # load_model only returns a backend whose golden run passed; None means the package has none.
        report = loaded.golden
        if report is not None and not report.passed:
            raise BackendError(f"{package.root}: {report.summary()}")
        if report is None:
            log.warning("package %s has no golden data: served without a self-check", package.root)
        # The manifest's spec carries resize/colour/mean/std; the backend's own view of its inputs
        # only knows names, shapes and dtypes.
        fed = {c.name for c in package.manifest.constants} | {s.input for s in package.manifest.state}
        data_specs = [spec for spec in loaded.input_specs if spec.name not in fed]
        spec = data_specs[0]
        image_pre = None
        if len(data_specs) == 1 and len(spec.shape) == 4 and (spec.layout or "NCHW") in ("NCHW", "NHWC"):
            image_pre = ImagePreprocessor.from_spec(spec)
        text = package.manifest.text
        text_pre = (
            None
            if text is None
            else TextPreprocessor.from_file(package.path(text.tokenizer), text, loaded.input_specs)
        )
        sensor_pre = (
            None
            if image_pre is not None or text_pre is not None or len(data_specs) > 1
            else SensorPreprocessor(spec)
        )
        session = ModelSession(
            package=package,
            loaded=loaded,
            decoder=make_decoder(package.manifest, package.labels()),
            image_pre=image_pre,
            sensor_pre=sensor_pre,
            text_pre=text_pre,
        )
        for _ in range(replicas - 1):
            # the same backend the first copy settled on, not a new search down the profile's order
            extra.append(
                load_model(
                    package, profile, backend=loaded.backend_name, threads=threads, cache_dir=cache_dir
                )
            )
            session.add_replica(extra[-1])
        session.warm_up()
        return session
    except BaseException:
        for model in (loaded, *extra):
            model.close()
        raise


# ---------------------------------------------------------------------------------------------------------
# The public Python API


class Model:
    """A package served in this process: `infer(x)` returns the prediction payload's `result` object."""

    def __init__(self, session: ModelSession, unpacked: Path | None = None):
        self._session: ModelSession | None = session
        self._unpacked = unpacked  # a .tar unpacked for this model; removed on close
        manifest = session.package.manifest
        self.name = manifest.name
        self.version = manifest.version
        self.task = manifest.task
        self.backend = session.backend_name
        self.provider = session.provider
        self.inputs: list[TensorSpec] = list(session.input_specs)

    @property
    def session(self) -> ModelSession:
        if self._session is None:
            raise EdgeError(f"model '{self.name}' is closed")
        return self._session

    def infer(self, x: ModelInput) -> Result:
        """One input: an HxWx3 uint8 RGB image (or HxW gray), a (window, channels) sensor window,
        a text string (packages with a tokenizer), or a dict of ready tensors by input name."""
        session = self.session
        if isinstance(x, str):
            if session.text_pre is None:
                raise EdgeError(
                    f"model '{self.name}' takes {self._input_summary()}, not text (it has no tokenizer)"
                )
            return session.infer(x)[0]
        if isinstance(x, Mapping):
            return session.infer_feeds(x)[0]
        if not isinstance(x, np.ndarray):
            raise EdgeError(
                f"model '{self.name}': expected a numpy array or a dict of them, got {type(x).__name__}"
            )
        return session.infer(x, color="RGB")[0]

    def infer_batch(self, inputs: Sequence[ModelInput]) -> list[Result]:
        """Several inputs, one result each, in order; images in one backend call when the package has a
        dynamic batch axis."""
        if inputs and all(isinstance(x, np.ndarray) and x.dtype == np.uint8 for x in inputs):
            arrays = [x for x in inputs if isinstance(x, np.ndarray)]
            return [result for result, _ in self.session.infer_batch(arrays, color="RGB")]
        return [self.infer(x) for x in inputs]

    def reset_state(self) -> None:
        """Start the recurrent state over (stateful packages carry it from one `infer` to the next)."""
        self.session.reset_state()

    def _input_summary(self) -> str:
        return ", ".join(f"'{spec.name}' {spec.shape} {spec.dtype}" for spec in self.inputs)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._unpacked is not None:
            shutil.rmtree(self._unpacked, ignore_errors=True)
            self._unpacked = None

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r} {self.version}, {self.task}, {self.backend}/{self.provider})"


def open_model(
    path_or_tar: str | Path,
    profile: str = "auto",
    backend: str | None = None,
    threads: int | None = None,
    trusted_keys: list[bytes] | None = None,
) -> Model:
    """Open a package directory or `.tar`: verified (hashes; signature when `trusted_keys` are given),
    loaded on the best backend the device profile allows and golden-checked."""
    path = Path(path_or_tar)
    unpacked: Path | None = None
    if path.is_file():
        unpacked = Path(tempfile.mkdtemp(prefix="edge-model-"))
        try:
            root = extract_archive(path, unpacked)
        except PackageError:
            shutil.rmtree(unpacked, ignore_errors=True)
            raise
    else:
        root = path
    try:
        package = load_package(root, trusted_keys=trusted_keys)
        device = resolve_profile(profile).profile
        session = open_session(package, device, backend=backend, threads=threads)
    except BaseException:
        if unpacked is not None:
            shutil.rmtree(unpacked, ignore_errors=True)
        raise
    return Model(session, unpacked)
