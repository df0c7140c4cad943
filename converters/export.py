"""torch -> ONNX: the dynamo exporter at opset 18 with weights inline, the legacy exporter at opset 17 as a
fallback, then a check that ONNX Runtime reproduces torch's outputs on real samples.

The batch axis (dimension 0 of every input and output) is exported symbolic, `N`, so the daemon can run
several frames in one call (`batching:`); a model whose graph fixes its batch is exported with batch 1,
and says so (`ExportResult.dynamic_batch`). The check runs a batch of several samples too.

Tolerance: |ort - torch| <= ATOL + RTOL * max|torch| per output. Float re-association in fused kernels
gives ~1e-5 relative differences; anything near 1e-3 of the output range means a wrong graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeError

ATOL = 1e-4
RTOL = 1e-3
DYNAMO_OPSET = 18
LEGACY_OPSET = 17


class ExportError(EdgeError):
    """torch could not be exported to ONNX, or the export does not reproduce torch."""


@dataclass
class ExportResult:
    path: Path
    exporter: str  # "dynamo" | "legacy"
    opset: int
    max_abs_diff: float
    tolerance: dict[str, float]
    output_names: list[str]
    dynamic_batch: bool = False


def export_onnx(
    module: Any,
    example_feeds: list[dict[str, np.ndarray]],
    input_names: list[str],
    out_path: Path,
    output_names: list[str] | None = None,
) -> ExportResult:
    import torch

    module.eval()
    example = tuple(torch.from_numpy(example_feeds[0][name]) for name in input_names)
    with torch.no_grad():
        reference = module(*example)
    n_outputs = len(reference) if isinstance(reference, (tuple, list)) else 1
    if output_names is None:
        output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    errors: list[str] = []
    exporter = ""
    opset = 0
    dynamic = False
    attempts = [(e, o, True) for e, o in EXPORTERS] + [(e, o, False) for e, o in EXPORTERS]
    for exporter, opset, dynamic in attempts:
        try:
            _export(module, example, input_names, output_names, out_path, exporter, opset, dynamic)
            if dynamic:
                _check_batched(module, out_path, example_feeds, input_names)
            break
        except Exception as exc:
            kind = "dynamic batch" if dynamic else "batch 1"
            errors.append(f"{exporter} ({kind}): {type(exc).__name__}: {_first_line(exc)}")
            out_path.unlink(missing_ok=True)
    else:
        raise ExportError("torch.onnx.export failed with both exporters: " + "; ".join(errors))
    diff = check_against_torch(module, out_path, example_feeds[:4], input_names)
    return ExportResult(
        path=out_path,
        exporter=exporter,
        opset=opset,
        max_abs_diff=diff,
        tolerance={"atol": ATOL, "rtol": RTOL},
        output_names=output_names,
        dynamic_batch=dynamic,
    )


EXPORTERS = (("dynamo", DYNAMO_OPSET), ("legacy", LEGACY_OPSET))
BATCH = "N"


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _check_batched(
    module: Any, path: Path, feeds: list[dict[str, np.ndarray]], input_names: list[str]
) -> None:
    """The exported batch axis is real: inputs and outputs say `N`, and a batch of samples gives what each
    sample gives alone."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param == "" or dims[0].HasField("dim_value"):
            raise ExportError(f"{path.name}: '{value.name}' kept a fixed batch dimension")
    samples = (feeds * 3)[:3]
    batched = {name: np.concatenate([f[name] for f in samples]) for name in input_names}
    alone = torch_outputs(module, samples, input_names)
    from converters.accuracy import run_onnx

    [together] = run_onnx(path, [batched])
    for index, out in enumerate(together):
        ref = np.concatenate([sample[index] for sample in alone])
        limit = ATOL + RTOL * float(np.max(np.abs(ref))) if ref.size else ATOL
        if out.shape != ref.shape or float(np.max(np.abs(out - ref), initial=0.0)) > limit:
            raise ExportError(f"{path.name}: a batch of {len(samples)} does not give each sample's output")


def _export(
    module: Any,
    example: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    out_path: Path,
    exporter: str,
    opset: int,
    dynamic_batch: bool,
) -> None:
    import torch

    if dynamic_batch:
        # torch.export specialises a dimension of size 1: trace with two samples so the batch stays free.
        example = tuple(torch.cat([t, t]) for t in example)
        batch = torch.export.Dim("N", min=1, max=1024)

    # The exporters log and warn at length on success; a user sees the stage result instead.
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(
                    module,
                    example,
                    str(out_path),
                    dynamo=True,
                    opset_version=opset,
                    external_data=False,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=[{0: batch} for _ in example] if dynamic_batch else None,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    module,
                    example,
                    str(out_path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes={name: {0: BATCH} for name in [*input_names, *output_names]}
                    if dynamic_batch
                    else None,
                    do_constant_folding=True,
                )
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    if not out_path.is_file():
        raise RuntimeError("exporter wrote no file")


def torch_outputs(
    module: Any, feeds: list[dict[str, np.ndarray]], input_names: list[str]
) -> list[list[np.ndarray]]:
    import torch

    results = []
    with torch.no_grad():
        for feed in feeds:
            out = module(*(torch.from_numpy(feed[name]) for name in input_names))
            items = out if isinstance(out, (tuple, list)) else [out]
            results.append([t.detach().cpu().numpy() for t in items])
    return results


def check_against_torch(
    module: Any, onnx_path: Path, feeds: list[dict[str, np.ndarray]], input_names: list[str]
) -> float:
    from converters.accuracy import run_onnx

    expected = torch_outputs(module, feeds, input_names)
    got = run_onnx(onnx_path, feeds)
    worst = 0.0
    for sample, (ref_outs, ort_outs) in enumerate(zip(expected, got, strict=True)):
        for index, (ref, out) in enumerate(zip(ref_outs, ort_outs, strict=True)):
            if ref.shape != out.shape:
                raise ExportError(
                    f"{onnx_path.name}: output {index} shape {list(out.shape)} != torch {list(ref.shape)}"
                )
            diff = float(np.max(np.abs(ref.astype(np.float64) - out))) if ref.size else 0.0
            limit = ATOL + RTOL * float(np.max(np.abs(ref))) if ref.size else ATOL
            if diff > limit:
                raise ExportError(
                    f"{onnx_path.name}: ONNX Runtime differs from torch by {diff:.3g} on output {index} of "
                    f"sample {sample} (tolerance {limit:.3g})"
                )
            worst = max(worst, diff)
    return worst
