"""TFLite export: torch module -> fp32 / fp16 / int8 `.tflite`, without TensorFlow.

litert-torch lowers the module (wrapped so the file's image I/O is NHWC, the layout LiteRT delegates
want); litert-quantizer (ai-edge-quantizer) then casts weights to float16 for GPU profiles, or
calibrates and quantizes weights and activations to int8 (on an AVX-512 VNNI host ~0.5x ORT fp32 latency on
XNNPACK). int8 keeps the ops that produce the model's outputs in float compute (int8 weights, dequantized)
because int8 logits clip at the calibration maximum and flip confident top-1 answers.

int8 is bias-corrected, as the ONNX path is (converters.quantize): rounding weights to int8 shifts each
output channel's mean by (W_int8 - W) . E[input]; the first quantization gives the int8 weights
litert-quantizer picks, the float model's biases absorb the shift (input means measured on the
calibration samples with the float interpreter), and the corrected float model is calibrated and
quantized again (same weights). On EfficientNet-Lite0 (208 held-out photo crops) this took top-1
agreement with fp32 from 0.875 to 0.942, and from 0.952 to 1.000 where fp32 is confident. The correction
only removes the weights' part of the shift; where activation rounding shifted the other way (a small
test CNN: the logits' mean shift 0.40 plain, 0.63 corrected) it can leave the outputs farther from float,
so both are built and the one closer to the float model on the calibration samples is kept.

The returned `TensorSpec`s describe the file's own I/O (layout, dtype, scale/zero point) for the
manifest's per-artifact `inputs`/`outputs`. torch and the litert packages are imported inside functions.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.errors import ConfigError, EdgeError, PackageError
from edge.package import TensorSpec

Precision = Literal["fp32", "fp16", "int8"]
_Layout4 = Literal["NHWC", "NCHW"]
INSTALL_HINT = "pip install edge-runtime[tflite-convert]"
RUNTIME_HINT = "pip install ai-edge-litert"
# Ops walked back from a graph output while looking for the layer whose weights make the logits.
_MAX_OUTPUT_WALK = 4
_PROGRESS_ENV = "LITERT_TORCH_SHOW_PROGRESS"
_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")  # ops bias correction adjusts


class TfliteExportError(EdgeError):
    """litert-torch or litert-quantizer could not convert the model."""


@dataclass(frozen=True)
class TfliteExport:
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str
    seconds: float
    bias_corrected: bool = False  # int8: the bias-corrected quantization was the closer one and was kept


def export_tflite(
    model: Any,
    example_inputs: tuple,
    out_path: Path,
    precision: Precision,
    calib_samples: list[np.ndarray] | None = None,
    channel_last_io: bool = True,
    bias_correction: bool = True,
) -> TfliteExport:
    """Convert an eval-mode torch module to `out_path` (written atomically) at `precision`.

    `example_inputs` and `calib_samples` are in the model's own (torch, NCHW) layout, exactly as fed to
    the ONNX export and calibration; with `channel_last_io` every input of rank >= 3 becomes channels-last
    in the .tflite and the samples are transposed to match.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"tflite precision '{precision}': expected fp32, fp16 or int8")
    if precision == "int8" and not calib_samples:
        raise ConfigError(f"{out_path}: int8 TFLite export needs calibration samples (--calib)")
    if precision == "int8" and len(example_inputs) != 1:
        raise ConfigError(
            f"{out_path}: int8 TFLite calibration supports single-input models, got {len(example_inputs)} inputs"
        )
    out_path = Path(out_path)
    started = time.perf_counter()
    corrected = False
    float_model = _convert_float(model, example_inputs, out_path, channel_last_io)
    if precision == "fp16":
        model_bytes = _cast_fp16(float_model, out_path)
    elif precision == "int8":
        assert calib_samples is not None
        channel_last = channel_last_io and np.asarray(calib_samples[0]).ndim >= 3
        model_bytes, corrected = _quantize_int8(
            float_model, calib_samples, channel_last, out_path, bias_correction
        )
    else:
        model_bytes = float_model
    _write_atomic(out_path, model_bytes)
    # Only image inputs are made channels-last; outputs keep the module's own (torch) layout.
    inputs, outputs = _io_specs(out_path, "NHWC" if channel_last_io else "NCHW", "NCHW")
    return TfliteExport(
        path=out_path,
        inputs=inputs,
        outputs=outputs,
        precision=precision,
        seconds=time.perf_counter() - started,
        bias_corrected=corrected,
    )


def load_tflite_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The I/O specs of a .tflite as the interpreter sees them (names, shapes, dtypes, quantization);
    rank-4 tensors are taken as NHWC, the TFLite convention, e.g. for a third-party file packaged as is."""
    return _io_specs(Path(path), "NHWC", "NHWC")


def _io_specs(
    path: Path, input_layout: _Layout4, output_layout: _Layout4
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    interpreter = _interpreter(path, threads=1)
    inputs = [_spec(detail, input_layout) for detail in interpreter.get_input_details()]
    outputs = [_spec(detail, output_layout) for detail in interpreter.get_output_details()]
    return inputs, outputs


class TfliteRunner:
    """One XNNPACK interpreter, fed real (float) values: quantized inputs are quantized here with the
    tensor's own scale/zero point and quantized outputs dequantized, so results compare with fp32 ones."""

    def __init__(self, path: Path, threads: int = 2, content: bytes | None = None) -> None:
        """`content`: the model's bytes, not yet written to `path` (which then only names it in errors)."""
        self.path = Path(path)
        self._interpreter = (
            _interpreter(self.path, threads=threads)
            if content is None
            else _interpreter_from_bytes(content, self.path, threads)
        )
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()

    @property
    def input_names(self) -> list[str]:
        return [detail["name"] for detail in self._inputs]

    def __call__(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        arrays = self._ordered(feeds)
        for detail, array in zip(self._inputs, arrays, strict=True):
            value = np.asarray(array)
            if tuple(value.shape) != tuple(detail["shape"]):
                raise ConfigError(
                    f"{self.path}: input '{detail['name']}' expects shape {list(detail['shape'])}, "
                    f"got {list(value.shape)}"
                )
            self._interpreter.set_tensor(detail["index"], _to_tensor_dtype(value, detail))
        self._interpreter.invoke()
        return [_dequantize(self._interpreter.get_tensor(d["index"]), d) for d in self._outputs]

    def _ordered(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(feeds, Mapping):
            missing = [name for name in self.input_names if name not in feeds]
            if missing and len(feeds) == len(self._inputs) == 1:
                return list(feeds.values())  # one input: its name in the caller's manifest may differ
            if missing:
                raise ConfigError(f"{self.path}: feeds lack TFLite input(s) {missing}")
            return [feeds[name] for name in self.input_names]
        if len(feeds) != len(self._inputs):
            raise ConfigError(f"{self.path}: expected {len(self._inputs)} input array(s), got {len(feeds)}")
        return list(feeds)


def run_tflite(
    path: Path, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray], threads: int = 2
) -> list[np.ndarray]:
    """Run one batch on XNNPACK; feeds are real values in the file's own layout (see `to_channel_last`)."""
    return TfliteRunner(path, threads=threads)(feeds)


def to_channel_last(array: np.ndarray) -> np.ndarray:
    """NCHW (or any N, C, ...) sample -> the NHWC layout a `channel_last_io` export expects."""
    array = np.asarray(array)
    if array.ndim < 3:
        return array
    return np.ascontiguousarray(np.moveaxis(array, 1, -1))


# -- conversion ---------------------------------------------------------------------------------------


def _convert_float(model: Any, example_inputs: tuple, out_path: Path, channel_last_io: bool) -> bytes:
    try:
        import litert_torch
        import torch
    except ImportError as exc:
        raise ConfigError(f"{out_path}: TFLite export needs litert-torch ({INSTALL_HINT}): {exc}") from exc
    model = model.eval()
    sample_args = tuple(
        torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in example_inputs
    )
    if channel_last_io:
        image_args = [i for i, x in enumerate(sample_args) if x.dim() >= 3]
        if image_args:
            model = litert_torch.to_channel_last_io(model, args=image_args).eval()
            sample_args = tuple(
                x.movedim(1, -1).contiguous() if i in image_args else x for i, x in enumerate(sample_args)
            )
    # litert-torch draws a progress tree per stage; the converter prints its own stage lines instead.
    previous = os.environ.get(_PROGRESS_ENV)
    os.environ.setdefault(_PROGRESS_ENV, "n")
    try:
        with torch.no_grad():
            converted = litert_torch.convert(model, sample_args)
        return bytes(converted.model_content())
    except Exception as exc:
        raise TfliteExportError(f"{out_path}: litert-torch conversion failed: {_first_line(exc)}") from exc
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS_ENV, None)


def _quantizer_modules(out_path: Path) -> tuple[Any, Any, Any, Any]:
    try:
        from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe
    except ImportError as exc:
        raise ConfigError(
            f"{out_path}: TFLite fp16/int8 needs litert-quantizer ({INSTALL_HINT}): {exc}"
        ) from exc
    return algorithm_manager, qtyping, quantizer, recipe


def _cast_fp16(float_model: bytes, out_path: Path) -> bytes:
    algorithm_manager, qtyping, quantizer, _ = _quantizer_modules(out_path)
    try:
        qt = quantizer.Quantizer(bytearray(float_model))
        qt.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
        )
        return bytes(qt.quantize(enable_progress_report=False).quantized_model)
    except Exception as exc:
        raise TfliteExportError(f"{out_path}: fp16 weight cast failed: {_first_line(exc)}") from exc


def _quantize_int8(
    float_model: bytes,
    calib_samples: list[np.ndarray],
    channel_last: bool,
    out_path: Path,
    bias_correction: bool = True,
) -> tuple[bytes, bool]:
    """The int8 model, and whether its biases were corrected (see the module's docstring)."""
    algorithm_manager, qtyping, quantizer, recipe = _quantizer_modules(out_path)
    interpreter = _interpreter_from_bytes(float_model, out_path)
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise TfliteExportError(
            f"{out_path}: expected one signature in the float model, found {len(signatures)}"
        )
    signature, io = next(iter(signatures.items()))
    input_name = io["inputs"][0]
    expected_shape = tuple(
        interpreter.get_signature_runner(signature).get_input_details()[input_name]["shape"]
    )
    calibration = []
    for index, sample in enumerate(calib_samples):
        array = np.asarray(sample, dtype=np.float32)
        if array.ndim == len(expected_shape) - 1:
            array = array[None]
        if channel_last:
            array = to_channel_last(array)
        if tuple(array.shape) != expected_shape:
            raise ConfigError(
                f"{out_path}: calibration sample {index} has shape {list(array.shape)}, "
                f"the TFLite input wants {list(expected_shape)}"
            )
        calibration.append({input_name: array})

    def quantize(model: bytes) -> bytes:
        qt = quantizer.Quantizer(bytearray(model), recipe.static_wi8_ai8())
        _keep_outputs_float(qt, model, algorithm_manager, qtyping)
        qsvs = _calibrate_minmax(model, qt.get_quantization_recipe(), {signature: calibration})
        return bytes(qt.quantize(qsvs, enable_progress_report=False).quantized_model)

    try:
        quantized = quantize(float_model)
        if not bias_correction:
            return quantized, False
        samples = [sample[input_name] for sample in calibration]
        corrected_float = _correct_biases(float_model, quantized, samples)
        if corrected_float is None:
            return quantized, False
        corrected = quantize(corrected_float)
        reference = _outputs(float_model, samples, out_path)
        plain_error = _squared_error(quantized, samples, reference, out_path)
        if _squared_error(corrected, samples, reference, out_path) < plain_error:
            return corrected, True
        return quantized, False
    except EdgeError:
        raise
    except Exception as exc:
        raise TfliteExportError(f"{out_path}: int8 quantization failed: {_first_line(exc)}") from exc


def _correct_biases(float_model: bytes, quantized: bytes, samples: list[np.ndarray]) -> bytes | None:
    """`float_model` with each int8-weighted CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED bias reduced by
    (W_int8 - W) . E[input], W_int8 read from `quantized` (ops matched by output tensor name); None when
    no bias could be corrected. Zero padding and activation clipping make it approximate at borders."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    float_fb, quant_fb = tfl.read_model(bytearray(float_model)), tfl.read_model(bytearray(quantized))
    graph, quant_graph = float_fb.subgraphs[0], quant_fb.subgraphs[0]
    quant_ops = {
        _tensor_name(quant_graph.tensors[op.outputs[0]]): op for op in quant_graph.operators if op.outputs
    }
    weight_users: dict[int, int] = {}
    for tensor in graph.tensors:
        weight_users[tensor.buffer] = weight_users.get(tensor.buffer, 0) + 1
    errors: list[tuple[str, Any, np.ndarray]] = []  # (op kind, float op, W_int8 - W)
    for op in graph.operators:
        kind = tfl.TFL_OP_CODE_TO_NAME.get(float_fb.operatorCodes[op.opcodeIndex].builtinCode)
        kind_name = str(kind.value) if kind is not None else ""
        if kind_name not in _BIASED_OPS or len(op.inputs) < 3 or op.inputs[2] < 0 or not op.outputs:
            continue
        bias_tensor = graph.tensors[op.inputs[2]]
        quant_op = quant_ops.get(_tensor_name(graph.tensors[op.outputs[0]]))
        if quant_op is None or weight_users.get(bias_tensor.buffer) != 1:
            continue
        int8_weight = quant_graph.tensors[quant_op.inputs[1]]
        params = int8_weight.quantization
        weight = tfl.get_tensor_data(graph.tensors[op.inputs[1]], float_fb.buffers)
        values = tfl.get_tensor_data(int8_weight, quant_fb.buffers)
        if tfl.TENSOR_CODE_TO_TYPE[int8_weight.type] != "INT8" or params is None or params.scale is None:
            continue
        if weight is None or values is None or tfl.get_tensor_data(bias_tensor, float_fb.buffers) is None:
            continue
        axis = [1] * values.ndim
        axis[params.quantizedDimension if len(params.scale) > 1 else 0] = -1
        scale = np.asarray(params.scale, np.float64).reshape(axis if len(params.scale) > 1 else [1])
        zero = np.asarray(params.zeroPoint, np.float64).reshape(scale.shape)
        errors.append((kind_name, op, (values.astype(np.float64) - zero) * scale - weight.astype(np.float64)))
    if not errors:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        interpreter = Interpreter(model_content=float_model, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    sums: dict[int, np.ndarray] = {}
    for sample in samples:
        interpreter.set_tensor(input_index, sample)
        interpreter.invoke()
        for _, op, _ in errors:
            value = np.asarray(interpreter.get_tensor(op.inputs[0]), np.float64)
            sums[op.inputs[0]] = sums.get(op.inputs[0], 0) + value.reshape(-1, value.shape[-1]).mean(0)
    corrected = 0
    for kind_name, op, error in errors:
        mean = sums[op.inputs[0]] / len(samples)  # per input channel (TFLite is channels-last)
        if kind_name == "CONV_2D":  # [out, kh, kw, in]
            if error.shape[3] != mean.size:
                continue  # a grouped convolution: its inputs per group are not the tensor's channels
            shift = (error.sum(axis=(1, 2)) * mean[None, :]).sum(axis=1)
        elif kind_name == "DEPTHWISE_CONV_2D":  # [1, kh, kw, in * multiplier]
            per_output = error.sum(axis=(0, 1, 2))
            shift = per_output * np.repeat(mean, per_output.size // mean.size)
        else:  # FULLY_CONNECTED [out, in]
            shift = error @ mean
        bias_tensor = graph.tensors[op.inputs[2]]
        bias = tfl.get_tensor_data(bias_tensor, float_fb.buffers)
        assert bias is not None
        new_bias = (bias.astype(np.float64) - shift).astype(np.float32)
        float_fb.buffers[bias_tensor.buffer].data = np.frombuffer(new_bias.tobytes(), np.uint8)
        corrected += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(float_fb)) if corrected else None


def _outputs(content: bytes, samples: list[np.ndarray], where: Path) -> list[list[np.ndarray]]:
    """Every output of the model `content` (being written to `where`) for each sample, as real values."""
    runner = TfliteRunner(where, threads=max(1, min(2, os.cpu_count() or 1)), content=content)
    return [runner([sample]) for sample in samples]


def _squared_error(
    content: bytes, samples: list[np.ndarray], reference: list[list[np.ndarray]], where: Path
) -> float:
    outputs = _outputs(content, samples, where)
    return float(
        sum(
            np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2)
            for got_all, want_all in zip(outputs, reference, strict=True)
            for got, want in zip(got_all, want_all, strict=True)
        )
    )


def _calibrate_minmax(float_model: bytes, quant_recipe: Any, data: dict[str, list]) -> dict[str, Any]:
    """Plain min/max over all samples, as the ONNX MinMax calibration does. litert-quantizer's default
    is a 0.95 moving average of per-sample ranges, which depends on sample order and under-covers the
    extremes (the source of clipped int8 logits)."""
    from ai_edge_quantizer import calibrator, recipe_manager

    def widen(seen: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        if not seen:
            return new
        return {**new, "min": np.minimum(seen["min"], new["min"]), "max": np.maximum(seen["max"], new["max"])}

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(quant_recipe)
    calib = calibrator.Calibrator(
        bytearray(float_model), num_threads=max(1, min(2, os.cpu_count() or 1)), qsv_update_func=widen
    )
    with warnings.catch_warnings():
        # Calibration needs every intermediate tensor; the interpreter warns that this is for debugging.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        calib.calibrate(data, manager)
    return dict(calib.get_model_qsvs())


def _keep_outputs_float(qt: Any, float_model: bytes, algorithm_manager: Any, qtyping: Any) -> None:
    """Float compute (int8 weights, dequantized) for the ops between the last weighted layer and each
    graph output, and float graph outputs: int8 logits saturate at the calibration range."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(bytearray(float_model))
    graph = model.subgraphs[0]
    producers = {out: op for op in graph.operators for out in op.outputs}
    no_quantize = algorithm_manager.AlgorithmName.NO_QUANTIZE
    names = qtyping.TFLOperationName
    weighted_ops = {names.FULLY_CONNECTED, names.CONV_2D, names.DEPTHWISE_CONV_2D, names.BATCH_MATMUL}

    def scope_regex(op: Any) -> str:
        # An op's scope is its output tensor names joined by ';' (ai_edge_quantizer get_op_scope).
        tensor_names = [_tensor_name(graph.tensors[i]) for i in op.outputs if i >= 0]
        return "(^|;)(" + "|".join(re.escape(n) for n in tensor_names) + ")(;|$)"

    for output in graph.outputs:
        qt.update_quantization_recipe(
            "(^|;)" + re.escape(_tensor_name(graph.tensors[output])) + "(;|$)",
            qtyping.TFLOperationName.OUTPUT,
            algorithm_key=no_quantize,
        )
        tensor = output
        for _ in range(_MAX_OUTPUT_WALK):
            op = producers.get(tensor)
            if op is None:
                break
            op_name = tfl_flatbuffer_utils.TFL_OP_CODE_TO_NAME.get(
                model.operatorCodes[op.opcodeIndex].builtinCode
            )
            if op_name is None:
                break
            constants = [i for i in op.inputs if i >= 0 and _is_constant(model, graph.tensors[i])]
            activations = [i for i in op.inputs if i >= 0 and i not in constants]
            if constants and op_name in weighted_ops:
                try:
                    qt.add_weight_only_config(regex=scope_regex(op), operation_name=op_name, num_bits=8)
                except ValueError:  # the quantizer's policy refuses weight-only here: keep it all float
                    qt.update_quantization_recipe(scope_regex(op), op_name, algorithm_key=no_quantize)
                break
            qt.update_quantization_recipe(scope_regex(op), op_name, algorithm_key=no_quantize)
            if not activations:
                break
            tensor = activations[0]


def _is_constant(model: Any, tensor: Any) -> bool:
    buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return buffer is not None and buffer.data is not None and len(buffer.data) > 0


def _tensor_name(tensor: Any) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


# -- runtime ------------------------------------------------------------------------------------------


def _interpreter(path: Path, threads: int) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: TFLite file not found")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ConfigError(f"{path}: reading a .tflite needs ai-edge-litert ({RUNTIME_HINT})") from exc
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except Exception as exc:
        raise PackageError(f"{path}: not a loadable TFLite model: {_first_line(exc)}") from exc
    return interpreter


def _interpreter_from_bytes(content: bytes, out_path: Path, threads: int = 1) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ConfigError(f"{out_path}: TFLite export needs ai-edge-litert ({RUNTIME_HINT})") from exc
    try:
        interpreter = Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()
    except Exception as exc:
        raise TfliteExportError(f"{out_path}: converted model does not load: {_first_line(exc)}") from exc
    return interpreter


def _spec(detail: Mapping[str, Any], layout4: _Layout4) -> TensorSpec:
    shape: list[int | str] = [int(d) for d in detail["shape"]]
    signature = detail.get("shape_signature")
    if signature is not None and len(signature) == len(shape) and len(shape) > 0 and int(signature[0]) < 0:
        shape[0] = "N"  # a dynamic batch dimension
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantized = bool(scale) and np.dtype(detail["dtype"]).kind in "iu"
    layout: Literal["NHWC", "NCHW", "NC"] | None = None
    if len(shape) == 4:
        layout = layout4
    elif len(shape) == 2:
        layout = "NC"
    return TensorSpec(
        name=str(detail["name"]),
        shape=shape,
        dtype=np.dtype(detail["dtype"]).name,
        layout=layout,
        scale=float(scale) if quantized else None,
        zero_point=int(zero_point) if quantized else None,
    )


def _to_tensor_dtype(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind in "iu" and scale and value.dtype.kind == "f":
        info = np.iinfo(dtype)
        quantized = np.round(value / scale) + zero_point
        return np.clip(quantized, info.min, info.max).astype(dtype)
    return np.ascontiguousarray(value, dtype=dtype)


def _dequantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return np.array(value, copy=True)


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
