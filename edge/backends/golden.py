"""Golden self-check: run the package's golden inputs and compare with its golden outputs.

`golden/inputs.npz` holds one array per model input (keyed by input name), `golden/outputs.npz` one per
output. Samples are stacked along the first axis and fed as batches of the model's own batch size, so a
file holding a single batch is the same thing as a file holding one sample.

The manifest's `golden.tolerance` says how close is close enough:
`atol`/`rtol` (elementwise, like numpy.allclose), `cosine` (minimum cosine similarity per sample and
output), `top1` (minimum fraction of samples whose arg-max agrees). Only the given criteria are checked;
with none given, `atol=1e-3, rtol=1e-2` applies (fp32 kernels of two engines agree far better than that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import PackageError
from edge.package import TensorSpec

DEFAULT_TOLERANCE = {"atol": 1e-3, "rtol": 1e-2}
KNOWN_CRITERIA = ("atol", "rtol", "cosine", "top1")


@dataclass
class GoldenReport:
    passed: bool
    samples: int
    max_abs_error: float = 0.0
    min_cosine: float = 1.0
    top1_agreement: float = 1.0
    tolerance: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        text = (
            f"golden check {verdict} on {self.samples} sample(s): max |err| {self.max_abs_error:.3g}, "
            f"min cosine {self.min_cosine:.5f}, top-1 agreement {self.top1_agreement:.3f}"
        )
        return text + (f" ({self.failures[0]})" if self.failures else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "max_abs_error": self.max_abs_error,
            "min_cosine": self.min_cosine,
            "top1_agreement": self.top1_agreement,
            "tolerance": dict(self.tolerance),
            "failures": list(self.failures),
            "seconds": round(self.seconds, 4),
        }


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: not a readable .npz: {exc}") from exc


def _by_spec(arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], where: Path) -> list[np.ndarray]:
    """Arrays in spec order: by name, or by position when the file uses other names."""
    if all(spec.name in arrays for spec in specs):
        return [arrays[spec.name] for spec in specs]
    if len(arrays) == len(specs):
        return list(arrays.values())
    missing = [spec.name for spec in specs if spec.name not in arrays]
    raise PackageError(f"{where}: no array for tensor(s) {', '.join(missing)} (has {', '.join(arrays)})")


def _batch_size(spec: TensorSpec) -> int:
    first = spec.shape[0] if spec.shape else 1
    return first if isinstance(first, int) and first > 0 else 1


def _split(array: np.ndarray, batch: int) -> list[np.ndarray]:
    if array.ndim == 0 or array.shape[0] % batch:
        return [array]
    return [array[i : i + batch] for i in range(0, array.shape[0], batch)]


def _parts(array: np.ndarray, count: int) -> list[np.ndarray]:
    if array.ndim == 0 or count <= 0 or array.shape[0] % count:
        return [array]
    return list(np.split(array, count))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a64 @ b64 / (na * nb))


def _top1(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0] if array.ndim else 1, -1).argmax(-1)


def check_tolerance(tolerance: dict[str, float], where: str) -> dict[str, float]:
    unknown = sorted(set(tolerance) - set(KNOWN_CRITERIA))
    if unknown:
        raise PackageError(f"{where}: golden.tolerance: unknown criteria {unknown} (known: {KNOWN_CRITERIA})")
    return dict(tolerance) if tolerance else dict(DEFAULT_TOLERANCE)


def run_golden(
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    input_specs: Sequence[TensorSpec],
    output_specs: Sequence[TensorSpec],
    inputs_path: Path,
    outputs_path: Path,
    tolerance: dict[str, float],
) -> GoldenReport:
    """Feed every golden sample through `run` and compare each output with the reference."""
    started = time.perf_counter()
    tol = check_tolerance(tolerance, str(inputs_path.parent))
    feeds_all = _by_spec(load_npz(inputs_path), input_specs, inputs_path)
    refs_all = _by_spec(load_npz(outputs_path), output_specs, outputs_path)
    batch = _batch_size(input_specs[0])
    feed_batches = [_split(a, batch) for a in feeds_all]
    count = len(feed_batches[0])
    # Outputs are cut into as many equal parts as there are input batches: an output whose batch is not
    # its first axis (a CTC recognizer's [T, N, C]) is stacked along that first axis all the same.
    ref_batches = [_parts(a, count) for a in refs_all]
    if any(len(b) != count for b in feed_batches + ref_batches):
        raise PackageError(f"{inputs_path}: golden inputs and outputs hold different numbers of samples")

    report = GoldenReport(passed=True, samples=count, tolerance=tol)
    agree = 0
    for index in range(count):
        feeds = {spec.name: feed_batches[i][index] for i, spec in enumerate(input_specs)}
        outputs = run(feeds)
        for position, spec in enumerate(output_specs):
            got = np.asarray(outputs[position], dtype=np.float64)
            want = np.asarray(ref_batches[position][index], dtype=np.float64)
            if got.size != want.size:
                report.failures.append(
                    f"output '{spec.name}' sample {index}: shape {got.shape} != golden {want.shape}"
                )
                continue
            got = got.reshape(want.shape)
            error = np.abs(got - want)
            report.max_abs_error = max(report.max_abs_error, float(error.max(initial=0.0)))
            cosine = _cosine(got, want)
            report.min_cosine = min(report.min_cosine, cosine)
            if "atol" in tol or "rtol" in tol:
                bound = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * np.abs(want)
                if np.any(error > bound):
                    worst = float((error - bound).max())
                    report.failures.append(
                        f"output '{spec.name}' sample {index}: exceeds atol/rtol by {worst:.3g}"
                    )
            if "cosine" in tol and cosine < tol["cosine"]:
                report.failures.append(
                    f"output '{spec.name}' sample {index}: cosine {cosine:.5f} < {tol['cosine']}"
                )
            if position == 0:
                agree += int(np.array_equal(_top1(got), _top1(want)))
    report.top1_agreement = agree / count if count else 1.0
    if "top1" in tol and report.top1_agreement < tol["top1"]:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.3f} < {tol['top1']}")
    report.passed = not report.failures
    report.seconds = time.perf_counter() - started
    return report
