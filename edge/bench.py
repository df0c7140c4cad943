"""`edge-infer bench PKG [--json] [--backend NAME] [--threads N] [--seconds S]
[--compare PKG2 | --compare-backend NAME]`: how fast a package runs here, through the real engine layer.

Warm-up first, then latency percentiles (p50/p90/p99), throughput, peak RSS and the provider in use.
With `--compare`/`--compare-backend` the two subjects run interleaved in blocks (A x10, B x10, A x10, ...,
see `interleaved_latency_ms`), so thermal and noisy-neighbour drift hits both equally, and the ratios B/A
are printed.
Cold start (process start to first result, including the golden self-check a daemon does) and that
process's peak RSS are measured in a fresh subprocess per subject.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.backends import registry
from edge.errors import BackendError, ConfigError


@dataclass
class Subject:
    label: str
    package_dir: str
    backend: str | None
    model: Any = None
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


def bench_feeds(model: Any) -> dict[str, np.ndarray]:
    """The first golden sample when the package has one, else seeded random data of the right shape
    (constants at their value, recurrent state at zeros)."""
    package = model.package
    specs = model.backend.inputs
    golden = package.manifest.golden
    if golden is not None:
        with np.load(package.path(golden.inputs), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if all(s.name in arrays for s in specs):
            return {s.name: np.ascontiguousarray(arrays[s.name][: _batch(s.shape)]) for s in specs}
    rng = np.random.default_rng(0)
    feeds = {}
    constants = {c.name: c.value for c in package.manifest.constants}
    state = {link.input for link in package.manifest.state}
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = np.dtype(spec.dtype)
        if spec.name in constants:  # what the runtime feeds it, not noise
            feeds[spec.name] = np.full(shape, constants[spec.name], dtype)
        elif spec.name in state:  # a stream's first run
            feeds[spec.name] = np.zeros(shape, dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            feeds[spec.name] = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        else:
            feeds[spec.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds


def _batch(shape: list[int | str]) -> int:
    first = shape[0] if shape else 1
    return first if isinstance(first, int) and first > 0 else 1


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "mean": round(float(values.mean()), 4),
        "min": round(float(values.min()), 4),
    }


# ONNX Runtime's intra-op workers spin-wait for work for tens of milliseconds after a run (10 ms < spin <
# 50 ms, measured). Subjects interleaved run by run therefore ran beside the other subjects' spinning
# workers: on 2 cores, four sessions made EfficientNet-Lite0 fp32 2.4x slower and read int8/fp32 as 0.46x
# where each session alone gives 0.65x. A pause longer than the spin before each block lets them sleep.
SPIN_SETTLE_S = 0.1


def interleaved_latency_ms(
    runners: Mapping[str, Callable[[], object]],
    *,
    rounds: int | None = None,
    budget_s: float | None = None,
    block: int = 10,
    warmup: int = 2,
    min_rounds: int = 1,
) -> dict[str, list[float]]:
    """Milliseconds per call of each runner, measured in rotating blocks: for every subject a pause (so no
    other subject's thread pool still spins), `warmup` untimed calls, then `block` timed calls. Stops after
    `rounds` rounds or, once `min_rounds` are done, when `budget_s` is spent. A single subject runs without
    pauses: nothing else competes with it, just as in a daemon."""
    if rounds is None and budget_s is None:
        raise ValueError("interleaved_latency_ms needs rounds or budget_s")
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    deadline = clock() + budget_s if budget_s is not None else None
    round_index = 0
    while rounds is None or round_index < rounds:
        if deadline is not None and round_index >= min_rounds and clock() > deadline:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runners[name]
            if len(names) > 1:
                time.sleep(SPIN_SETTLE_S)
            for _ in range(warmup):
                run()
            for _ in range(block):
                started = clock()
                run()
                samples[name].append((clock() - started) * 1000)
        round_index += 1
    return samples


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cold_start(package_dir: str, backend: str | None, profile: str, threads: int | None) -> dict[str, Any]:
    """Start a fresh interpreter that loads the package and produces one result; time it from outside."""
    argv = [
        sys.executable,
        "-c",
        "from edge.bench import cold_child; cold_child()",
        package_dir,
        backend or "",
        profile,
        "" if threads is None else str(threads),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    first_result_ms = (time.perf_counter() - started) * 1000
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not line:
        raise BackendError(
            f"cold-start run of {package_dir} failed: {(err.strip().splitlines() or ['?'])[-1]}"
        )
    child = json.loads(line)
    return {"cold_start_ms": round(first_result_ms, 1), **child}


def cold_child() -> None:
    """Child side of `cold_start`: load, run once, print one JSON line, exit."""
    started = time.perf_counter()
    package_dir, backend, profile, threads = sys.argv[1:5]
    from edge.backends import load_model
    from edge.package import load_package
    from edge.profiles import resolve_profile

    imported = time.perf_counter()
    model = load_model(
        load_package(package_dir),
        resolve_profile(profile).profile,
        backend=backend or None,
        threads=int(threads) if threads else None,
    )
    loaded = time.perf_counter()
    model.run(bench_feeds(model))
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "import_ms": round((imported - started) * 1000, 1),
                "load_and_self_check_ms": round((loaded - imported) * 1000, 1),
                "first_inference_ms": round((done - loaded) * 1000, 2),
                "peak_rss_mb": peak_rss_mb(),
                "provider": model.provider,
            }
        ),
        flush=True,
    )


def run_bench(
    subjects: list[Subject],
    *,
    profile: str = "auto",
    threads: int | None = None,
    seconds: float = 5.0,
    warmup: int = 10,
    measure_cold_start: bool = True,
) -> dict[str, Any]:
    from edge.backends import load_model
    from edge.package import load_package
    from edge.profiles import resolve_profile

    device = resolve_profile(profile).profile
    for subject in subjects:
        subject.model = load_model(
            load_package(subject.package_dir), device, backend=subject.backend, threads=threads
        )
        subject.feeds = bench_feeds(subject.model)
    for _ in range(warmup):
        for subject in subjects:
            subject.model.run(subject.feeds)
    runners = {str(i): functools.partial(s.model.run, s.feeds) for i, s in enumerate(subjects)}
    measured = interleaved_latency_ms(runners, budget_s=seconds)
    for index, subject in enumerate(subjects):
        subject.latencies = measured[str(index)]

    results = []
    for subject in subjects:
        model = subject.model
        lat = percentiles(subject.latencies)
        entry: dict[str, Any] = {
            "label": subject.label,
            "package": model.package.manifest.name,
            "path": subject.package_dir,
            "backend": model.backend_name,
            "provider": model.provider,
            "providers_in_use": list(model.backend.providers_in_use),
            "artifact": model.artifact.path,
            "precision": model.artifact.precision,
            "fallback": model.fallback,
            "runs": len(subject.latencies),
            "latency_ms": lat,
            "throughput_per_s": round(1000.0 / lat["mean"], 2),
        }
        if measure_cold_start:
            entry["cold"] = cold_start(
                subject.package_dir, subject.backend or model.backend_name, device.name, threads
            )
        results.append(entry)
        model.close()
    report: dict[str, Any] = {
        "profile": device.name,
        "threads": threads if threads is not None else device.threads,
        "seconds": seconds,
        "subjects": results,
        "peak_rss_mb": peak_rss_mb(),
    }
    if len(results) == 2:
        a, b = results
        report["ratios"] = {
            "p50_b_over_a": round(b["latency_ms"]["p50"] / a["latency_ms"]["p50"], 4),
            "p99_b_over_a": round(b["latency_ms"]["p99"] / a["latency_ms"]["p99"], 4),
            "throughput_b_over_a": round(b["throughput_per_s"] / a["throughput_per_s"], 4),
        }
        if measure_cold_start:
            report["ratios"]["cold_start_b_over_a"] = round(
                b["cold"]["cold_start_ms"] / a["cold"]["cold_start_ms"], 4
            )
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"profile {report['profile']}, threads {report['threads'] or 'auto'}, {report['seconds']} s interleaved"
    ]
    for s in report["subjects"]:
        lat = s["latency_ms"]
        lines.append(
            f"{s['label']}: {s['package']} [{s['artifact']}] on {s['backend']} {s['provider']}"
            f"{' (fallback)' if s['fallback'] else ''}"
        )
        lines.append(
            f"  latency ms p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  "
            f"throughput {s['throughput_per_s']:.1f}/s  runs {s['runs']}"
        )
        if "cold" in s:
            c = s["cold"]
            lines.append(
                f"  cold start {c['cold_start_ms']:.0f} ms (load+self-check {c['load_and_self_check_ms']:.0f} ms), "
                f"peak RSS {c['peak_rss_mb']:.0f} MB"
            )
    lines.append(f"peak RSS (this process, all subjects) {report['peak_rss_mb']:.0f} MB")
    for name, value in report.get("ratios", {}).items():
        lines.append(f"ratio {name} {value:.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", metavar="PKG", help="package directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--backend", choices=registry.names(), help="force a backend")
    parser.add_argument("--threads", type=int, help="inference threads (default: the profile's)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up runs per subject (default 10)")
    parser.add_argument("--profile", default="auto", help="device profile name or path (default: auto)")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocess")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compare", metavar="PKG2", help="a second package, run interleaved")
    group.add_argument(
        "--compare-backend",
        metavar="NAME",
        choices=registry.names(),
        help="the same package on another backend, run interleaved",
    )


def main(args: argparse.Namespace) -> int:
    from edge.package import package_dir

    if args.seconds <= 0:
        raise ConfigError("--seconds: must be > 0")
    with contextlib.ExitStack() as unpacked:
        # a package .tar is benchmarked from a temporary unpacked copy, removed afterwards
        package = str(unpacked.enter_context(package_dir(args.package)))
        subjects = [Subject("A", package, args.backend)]
        if args.compare:
            subjects.append(
                Subject("B", str(unpacked.enter_context(package_dir(args.compare))), args.backend)
            )
        elif args.compare_backend:
            subjects.append(Subject("B", package, args.compare_backend))
        return _bench(args, subjects)


def _bench(args: argparse.Namespace, subjects: list[Subject]) -> int:
    report = run_bench(
        subjects,
        profile=args.profile,
        threads=args.threads,
        seconds=args.seconds,
        warmup=args.warmup,
        measure_cold_start=not args.no_cold_start,
    )
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
