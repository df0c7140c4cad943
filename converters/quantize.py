"""int8 quantization with ONNX Runtime: static QDQ, per-channel weights, scheme from the device profile.

Order: make the graph quantizable (opset >= 13 so per-channel QDQ exists; weights held in Constant nodes
become initializers, otherwise the quantizer sees them as activations and quantizes them per-tensor),
`quant_pre_process` (shape inference + graph optimization), name every node (exclusions refer to names),
then `quantize_static` calibrated on real samples. Calibration ranges are cached in a JSON file so that
re-quantizing with excluded nodes (the accuracy gate's search) does not calibrate again.

Bias correction (on by default): rounding weights to int8 shifts the *mean* of every output channel by
(W_int8 - W) . E[input], which a float bias can absorb exactly. The first quantization gives the int8
weights the runtime will use; the float biases are corrected with the input means measured on the
calibration samples, and the corrected model is quantized again (same weights, same cached ranges).
On EfficientNet-Lite0 this took top-1 agreement with fp32 from 0.87 to 0.94, and from 0.94 to 1.00 where
fp32 is confident (QDQ executed exactly, 208 held-out crops; see benchmarks/convert_bench.py).

`reduce_range` comes from the profile: x86 without VNNI multiplies u8 x s8 pairs with VPMADDUBSW, whose
int16 sums saturate with full-range int8 weights; 7-bit weights cannot saturate (ORT's own guidance).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from edge.errors import EdgeError
from edge.profiles import QuantizationScheme

if TYPE_CHECKING:
    import onnx

MIN_PER_CHANNEL_OPSET = 13
TARGET_OPSET = 17
CalibrationMethodName = Literal["minmax", "percentile", "entropy"]
# Nodes with weights: the ones per-layer sensitivity ranks and the gate may keep in float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AttributeValue = TypeVar("AttributeValue", int, float)

log = logging.getLogger(__name__)


class QuantizeError(EdgeError):
    """The model could not be quantized."""


@dataclass
class PreparedModel:
    path: Path  # float model, opset >= 13, weights as initializers, every node named: quantize this
    opset_before: int
    opset_after: int
    folded_constants: int
    node_names: list[str]  # weighted nodes, graph order


@dataclass
class QuantizeResult:
    path: Path
    method: CalibrationMethodName
    samples: int
    excluded_nodes: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    bias_corrected: list[str] = field(default_factory=list)  # nodes whose float bias absorbed the shift


class SampleReader:
    """`CalibrationDataReader` over a list of feeds (constructed lazily to keep onnxruntime import local).

    `set_range` lets ORT collect the samples a slice at a time (its `CalibStridedMinMax` loop, which
    works for every calibrator): samples of different shapes (a variable-width input) cannot be stacked
    into one array per tensor, and histograms merged per sample hold one sample's activations at a time
    instead of all of them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self._feeds[start_index:end_index])

    def __len__(self) -> int:
        return len(self._feeds)


def shapes_vary(feeds: list[dict[str, np.ndarray]]) -> bool:
    """Whether the samples differ in shape (a symbolic dimension the calibration set fixes per sample)."""
    first = {name: value.shape for name, value in feeds[0].items()} if feeds else {}
    return any({name: value.shape for name, value in feed.items()} != first for feed in feeds[1:])


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def fold_constant_nodes(model: onnx.ModelProto) -> int:
    """Move tensor-valued Constant nodes into initializers (in place); returns how many moved."""
    from onnx import numpy_helper

    keep = []
    moved = 0
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(tensor, name=node.output[0]))
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block with `path` as the process's current directory (restored after, even on error).

    ONNX Runtime's symbolic shape inference (`SymbolicShapeInference.infer_shapes`, called by
    `quant_pre_process`) saves the model it could not finish as `sym_shape_infer_temp.onnx`, with every
    weight in a uuid-named `.data` file beside it, relative to the current directory, before it raises;
    ORT has no option to send them elsewhere. Inside the work directory they are removed with it, instead
    of landing in whatever directory `edge-convert` was started from. (The process-wide cwd: the converter
    runs its stages in one thread, and every path it passes here is absolute.)"""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def prepare_for_quantization(source: Path, work_dir: Path) -> PreparedModel:
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import quant_pre_process

    model = onnx.load(str(source))
    opset_before = _opset(model)
    folded = fold_constant_nodes(model)
    if opset_before < MIN_PER_CHANNEL_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            raise QuantizeError(
                f"{source.name}: opset {opset_before} < {MIN_PER_CHANNEL_OPSET} and upgrading failed: {exc}"
            ) from exc
        folded += fold_constant_nodes(model)
    work_dir = work_dir.resolve()
    upgraded = work_dir / "model.upgraded.onnx"
    onnx.save(model, str(upgraded))
    prepared = work_dir / "model.prep.onnx"
    with warnings.catch_warnings(), working_directory(work_dir):
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(upgraded), str(prepared), skip_symbolic_shape=False)
        except Exception as exc:  # symbolic shape inference fails on some graphs; ORT's optimizer is optional
            log.info("quant_pre_process failed (%s); retrying without symbolic shapes", exc)
            try:
                quant_pre_process(str(upgraded), str(prepared), skip_symbolic_shape=True)
            except Exception:
                onnx.save(model, str(prepared))
    model = onnx.load(str(prepared))
    fold_constant_nodes(model)
    name_nodes(model)
    onnx.save(model, str(prepared))
    weighted = [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS]
    return PreparedModel(prepared, opset_before, _opset(model), folded, weighted)


def convert_fp16(source: Path, out_path: Path) -> None:
    """`source` with float16 weights and compute, its inputs and outputs kept float32 (Cast nodes at the
    edges), for profiles whose accelerator runs fp16 best (GPUs): ONNX Runtime's float16 converter, with
    its default list of ops that stay float32 where half precision is unsafe or unsupported."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(out_path))
    except Exception as exc:
        raise QuantizeError(f"{source.name}: fp16 conversion failed: {type(exc).__name__}: {exc}") from exc


def quantize_model(
    prepared: PreparedModel,
    out_path: Path,
    feeds: list[dict[str, np.ndarray]],
    scheme: QuantizationScheme,
    method: CalibrationMethodName = "minmax",
    exclude: list[str] | None = None,
    cache_path: Path | None = None,
    bias_correction: bool = True,
    op_types: list[str] | None = None,
) -> QuantizeResult:
    """`op_types`: quantize only these op types (None: every op ORT's QDQ quantizer takes)."""
    import onnx

    if not feeds:
        raise QuantizeError("no calibration samples (give --calib)")
    # The second pass of bias correction must reuse the first pass's ranges: keep them in a cache file.
    cache = cache_path or out_path.with_name(out_path.stem + ".calibration.json")
    if cache_path is None:
        cache.unlink(missing_ok=True)  # never reuse ranges from an earlier run into the same path
    if method in ("percentile", "entropy") and not cache.exists():  # cached ranges need no histograms
        log.warning(
            "%s calibration keeps activation histograms in memory (merged one sample at a time; "
            "collected all at once they took ~4 GB for 64 samples of a small CNN)",
            method,
        )
    _quantize_static(prepared.path, out_path, feeds, scheme, method, exclude, cache, op_types)
    corrected: list[str] = []
    if bias_correction:
        corrected_path = out_path.with_name(out_path.stem + ".bias-corrected.onnx")
        corrected = correct_biases(prepared.path, out_path, feeds, corrected_path)
        if corrected:
            _quantize_static(corrected_path, out_path, feeds, scheme, method, exclude, cache, op_types)
        corrected_path.unlink(missing_ok=True)
    if cache_path is None:
        cache.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for node in onnx.load(str(out_path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return QuantizeResult(out_path, method, len(feeds), list(exclude or []), counts, corrected)


def _quantize_static(
    source: Path,
    out_path: Path,
    feeds: list[dict[str, np.ndarray]],
    scheme: QuantizationScheme,
    method: CalibrationMethodName,
    exclude: list[str] | None,
    cache: Path,
    op_types: list[str] | None = None,
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    extra: dict[str, bool | int] = {
        "ActivationSymmetric": scheme.activations == "int8",
        "WeightSymmetric": True,
    }
    if method != "minmax" or shapes_vary(feeds):
        extra["CalibStridedMinMax"] = 1  # one sample per collection (SampleReader.set_range)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_static(
                str(source),
                str(out_path),
                SampleReader(feeds),
                quant_format=QuantFormat.QDQ if scheme.scheme == "qdq" else QuantFormat.QOperator,
                per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                activation_type=types[scheme.activations],
                weight_type=types[scheme.weights],
                nodes_to_exclude=list(exclude or []),
                op_types_to_quantize=op_types,
                calibrate_method=methods[method],
                extra_options=extra,
                calibration_cache_path=str(cache),
            )
        except Exception as exc:
            raise QuantizeError(f"quantize_static failed: {type(exc).__name__}: {exc}") from exc


# Bias correction ---------------------------------------------------------------------------------------


def _attribute(node: onnx.NodeProto, name: str, default: AttributeValue) -> AttributeValue:
    """The node's attribute `name`, or `default`; the caller states the type by its default."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weighted node name -> its weight as the int8 model computes with it (DequantizeLinear applied)."""
    from onnx import numpy_helper

    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        quantized = initializers[dq.input[0]].astype(np.float64)
        scale = initializers[dq.input[1]].astype(np.float64)
        has_zero_point = len(dq.input) > 2 and dq.input[2] in initializers
        zero_point = initializers[dq.input[2]].astype(np.float64) if has_zero_point else np.zeros_like(scale)
        shape = [1] * quantized.ndim
        if scale.size > 1:
            shape[_attribute(dq, "axis", 1) % quantized.ndim] = -1
        weights[node.name] = (quantized - zero_point.reshape(shape)) * scale.reshape(shape)
    return weights


def input_channel_means(
    model: onnx.ModelProto, node_names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Mean of each node's data input per channel (axis 1 of NCHW, last axis of 2-D) over the samples."""
    import onnx
    import onnxruntime as ort

    by_name = {n.name: n for n in model.graph.node}
    tensors = sorted({by_name[name].input[0] for name in node_names})
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in existing
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(out_names, sess.run(None, feed), strict=True):
            if name in tensors:
                array = np.asarray(value, dtype=np.float64)
                axes = (0, *range(2, array.ndim)) if array.ndim > 2 else (0,)
                sums[name] = sums.get(name, 0) + array.reshape(-1, *array.shape[1:]).mean(axis=axes)
    return {name: sums[by_name[name].input[0]] / len(feeds) for name in node_names}


def correct_biases(
    float_path: Path, quantized_path: Path, feeds: list[dict[str, np.ndarray]], out_path: Path
) -> list[str]:
    """Write `float_path` with each quantized Conv/Gemm bias reduced by (W_int8 - W) . E[input]; returns
    the corrected nodes. Zero padding and Clip saturation make the correction approximate at borders."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(float_path))
    quantized = dequantized_weights(onnx.load(str(quantized_path)))
    initializers = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes = [n for n in model.graph.node if n.name in quantized and n.input[1] in initializers]
    if not nodes:
        return []
    means = input_channel_means(model, [n.name for n in nodes], feeds)
    corrected: list[str] = []
    for node in nodes:
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        error = quantized[node.name] - weight
        mean = means[node.name]
        if node.op_type == "Conv":
            groups = int(_attribute(node, "group", 1))
            out_channels, in_per_group = error.shape[:2]
            if mean.shape != (groups * in_per_group,):
                continue
            mean_per_output = np.repeat(mean.reshape(groups, in_per_group), out_channels // groups, axis=0)
            shift = (error.reshape(out_channels, in_per_group, -1).sum(axis=2) * mean_per_output).sum(axis=1)
        else:  # Gemm: only the plain y = x W(^T) + b form
            plain = _attribute(node, "alpha", 1.0) == 1.0 and _attribute(node, "beta", 1.0) == 1.0
            if not plain or _attribute(node, "transA", 0) or weight.ndim != 2:
                continue
            shift = error @ mean if _attribute(node, "transB", 0) else mean @ error
        if len(node.input) > 2 and node.input[2] in initializers and uses[node.input[2]] == 1:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if bias.shape != shift.shape:
                continue
            initializers[node.input[2]].CopyFrom(
                numpy_helper.from_array((bias - shift).astype(np.float32), node.input[2])
            )
        elif node.op_type == "Conv" and len(node.input) == 2:
            name = f"{node.name}.bias_correction"
            model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            node.input.append(name)
        else:
            continue
        corrected.append(node.name)
    onnx.save(model, str(out_path))
    return corrected


def per_channel_weight_scales(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Shape of the scale of each weight DequantizeLinear feeding a Conv/Gemm/MatMul (per-channel: (C_out,))."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    shapes: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in initializers:
            shapes[node.name] = tuple(initializers[dq.input[1]].shape)
    return shapes
