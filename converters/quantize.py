"""int8 quantization with ONNX Runtime: static QDQ, per-channel weights, scheme from the device profile.

Order: make the graph quantizable (opset >= 13 so per-channel QDQ exists; weights held in Constant nodes
become initializers, otherwise the quantizer sees them as activations and quantizes them per-tensor),
`quant_pre_process` (shape inference + graph optimization), name every node (exclusions refer to names),
then `quantize_static` calibrated on real samples. Calibration ranges are cached in a JSON file so that
re-quantizing with excluded nodes (the accuracy gate's search) does not calibrate again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge.errors import EdgeError
from edge.profiles import QuantizationScheme

MIN_PER_CHANNEL_OPSET = 13
TARGET_OPSET = 17
CalibrationMethodName = Literal["minmax", "percentile", "entropy"]
# Nodes with weights: the ones per-layer sensitivity ranks and the gate may keep in float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

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


class SampleReader:
    """`CalibrationDataReader` over a list of feeds (constructed lazily to keep onnxruntime import local)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def fold_constant_nodes(model: Any) -> int:
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


def name_nodes(model: Any) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)


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
    upgraded = work_dir / "model.upgraded.onnx"
    onnx.save(model, str(upgraded))
    prepared = work_dir / "model.prep.onnx"
    with warnings.catch_warnings():
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


def quantize_model(
    prepared: PreparedModel,
    out_path: Path,
    feeds: list[dict[str, np.ndarray]],
    scheme: QuantizationScheme,
    method: CalibrationMethodName = "minmax",
    exclude: list[str] | None = None,
    cache_path: Path | None = None,
) -> QuantizeResult:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise QuantizeError("no calibration samples (give --calib)")
    if method in ("percentile", "entropy"):
        log.warning(
            "%s calibration keeps activation histograms in memory (~4 GB for 64 samples of a small CNN)",
            method,
        )
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    extra: dict[str, Any] = {"ActivationSymmetric": scheme.activations == "int8", "WeightSymmetric": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_static(
                str(prepared.path),
                str(out_path),
                SampleReader(feeds),
                quant_format=QuantFormat.QDQ if scheme.scheme == "qdq" else QuantFormat.QOperator,
                per_channel=scheme.per_channel,
                activation_type=types[scheme.activations],
                weight_type=types[scheme.weights],
                nodes_to_exclude=list(exclude or []),
                calibrate_method=methods[method],
                extra_options=extra,
                calibration_cache_path=str(cache_path) if cache_path else None,
            )
        except Exception as exc:
            raise QuantizeError(f"quantize_static failed: {type(exc).__name__}: {exc}") from exc
    counts: dict[str, int] = {}
    for node in onnx.load(str(out_path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return QuantizeResult(out_path, method, len(feeds), list(exclude or []), counts)


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
