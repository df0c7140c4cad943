"""torch -> ONNX: the dynamo exporter at opset 18 with weights inline, the legacy exporter at opset 17 as a
fallback, then a check that ONNX Runtime reproduces torch's outputs on real samples.

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
    for exporter, opset in (("dynamo", DYNAMO_OPSET), ("legacy", LEGACY_OPSET)):
        try:
            _export(module, example, input_names, output_names, out_path, exporter, opset)
            break
        except Exception as exc:
            errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
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
    )


def _export(
    module: Any,
    example: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    out_path: Path,
    exporter: str,
    opset: int,
) -> None:
    import torch

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
