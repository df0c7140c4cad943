"""Write the model package (docs/contracts.md): artifacts, manifest with measured metrics, golden data, labels,
signature. `write_package` is the one place that does it, for converted and as-is (.tflite) sources alike.

Everything is written inside `edge.package.staged_package`, so a failure leaves no half package behind and
an existing package at the destination is replaced only at the very end.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edge.errors import ConfigError, EdgeError, PackageError
from edge.package import (
    MANIFEST,
    Artifact,
    ConstantInput,
    Golden,
    Manifest,
    Package,
    Quantization,
    StateLink,
    TensorSpec,
    describe_file,
    load_package,
    staged_package,
    utc_now,
    write_manifest,
)
from edge.processing.text import TextConfig
from edge.profiles import DeviceProfile
from edge.tasks.base import TaskConfig

GOLDEN_SAMPLES = 4
ArtifactFormat = Literal["onnx", "tflite"]
Precision = Literal["fp32", "fp16", "int8"]
Json = dict[str, object]  # a JSON object of the manifest (metrics, pruning record, post-processing)


@dataclass(frozen=True)
class ArtifactFile:
    """A finished artifact in the work directory, copied into the package under `name`."""

    source: Path
    name: str
    format: ArtifactFormat
    precision: Precision
    quantization: Quantization | None = None
    inputs: list[TensorSpec] | None = None  # the file's own I/O where it differs from the package's
    outputs: list[TensorSpec] | None = None


@dataclass(frozen=True)
class GoldenSet:
    """Samples the runtime replays before it serves: inputs, the shipped model's outputs, and how close
    every backend and artifact must come to them."""

    feeds: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]  # per sample, per model output
    tolerance: dict[str, float]


@dataclass
class PackageSpec:
    name: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    artifacts: list[ArtifactFile]
    golden: GoldenSet
    postprocess: TaskConfig
    labels: list[str] | None = None
    pruning: Json | None = None
    metrics: Json = field(default_factory=dict)
    profile: str | None = None
    extra_files: dict[str, Path] = field(default_factory=dict)  # package-relative name -> file (report)
    text: TextConfig | None = None  # text models: the tokenizer (one of extra_files) and its padding
    constants: list[ConstantInput] = field(default_factory=list)
    state: list[StateLink] = field(default_factory=list)


def measure_latency_ms(
    paths: dict[str, Path],
    feed: dict[str, np.ndarray],
    runs: int = 30,
    threads: int = 2,
    budget_s: float = 10.0,
) -> dict[str, dict[str, float]]:
    """Median, p90 and fastest run per model over `runs` (at least 5, fewer once `budget_s` is spent), sessions
    interleaved in blocks of 5 so that load on the box hits all of them alike while no session runs
    beside another one's spinning thread pool (`edge.bench.interleaved_latency_ms`)."""
    from converters.accuracy import session
    from edge.bench import interleaved_latency_ms

    sessions = {key: session(path, threads) for key, path in paths.items()}
    for sess in sessions.values():
        sess.run(None, feed)
    block = 5
    samples = interleaved_latency_ms(
        {key: functools.partial(sess.run, None, feed) for key, sess in sessions.items()},
        rounds=max(1, runs // block),
        budget_s=budget_s,
        block=block,
    )
    return {
        key: {
            "p50": round(float(np.median(v)), 3),
            "p90": round(float(np.percentile(v, 90)), 3),
            "min": round(float(np.min(v)), 3),
        }
        for key, v in samples.items()
    }


def golden_tolerance(
    golden: list[list[np.ndarray]], others: list[list[list[np.ndarray]]]
) -> dict[str, float]:
    """Tolerance for the runtime self-check, from what this machine measured between the artifacts: the
    largest difference seen (with margin) and never tighter than float noise."""
    from converters.accuracy import cosine

    scale = max(float(np.max(np.abs(o))) for sample in golden for o in sample if o.size) or 1.0
    worst_abs, worst_cos = 0.0, 1.0
    for outputs in others:
        for g_sample, o_sample in zip(golden, outputs, strict=True):
            for g, o in zip(g_sample, o_sample, strict=True):
                worst_abs = max(worst_abs, float(np.max(np.abs(g.astype(np.float64) - o))) if g.size else 0.0)
                worst_cos = min(worst_cos, cosine(g, o))
    return {
        "atol": round(max(1.5 * worst_abs, 1e-3 * scale), 6),
        "cosine": round(min(0.999, worst_cos - 0.01), 4),
    }


def git_short_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=4", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=False,
        )
        return out.stdout.strip() or "local"
    except (OSError, subprocess.SubprocessError):
        return "local"


def check_out_dir(out_dir: Path, force: bool = False) -> None:
    """Refuse an `--out` that holds something other than a model package, so that writing the package
    (which replaces what is there) can never destroy a user's files: a file, or a non-empty directory
    without `manifest.json` unless `force`. A missing or empty directory, or a package, is fine."""
    try:
        if not out_dir.exists() and not out_dir.is_symlink():
            return
        if not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir}: exists and is not a directory; give a package directory")
        if force or (out_dir / MANIFEST).is_file() or next(out_dir.iterdir(), None) is None:
            return
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot inspect: {exc.strerror or exc}") from exc
    raise ConfigError(
        f"--out {out_dir}: directory is not empty and holds no {MANIFEST} (not a model package); "
        "refusing to replace it (--force replaces it)"
    )


def check_it_serves(package: Package, profile: DeviceProfile, out_dir: Path) -> None:
    """Open `package` exactly as `edge-infer` and `open_model` do (`edge.session.open_session`: backend
    choice, golden check, pre-processing built from the manifest's input spec, decoder, warm-up) on
    `profile`, falling back to whatever this machine has where the device's accelerator is missing.
    PackageError naming `out_dir` when the runtime would refuse it."""
    import onnxruntime as ort

    from edge.session import open_session

    here = profile.model_copy(update={"fallback": "allow"})  # the build host lacks the device's accelerator
    # The runtime's warnings about caching its optimized graph (in a temp dir here) are not the user's news.
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="edge-convert-engines-") as engines:
        try:
            session = open_session(package, here, threads=2, cache_dir=Path(engines))
        except (EdgeError, ValueError) as exc:
            reason = str(exc).replace(str(package.root), str(out_dir))
            raise PackageError(
                f"--out {out_dir}: not written: the runtime would refuse this package: {reason}"
            ) from exc
        session.close()


def write_package(
    out_dir: Path,
    spec: PackageSpec,
    *,
    sign_key: Path | None = None,
    sequence: int | None = None,
    force: bool = False,
    profile: DeviceProfile | None = None,
) -> Manifest:
    """Write `spec` as the package `out_dir`, signed with the ed25519 PEM `sign_key` when given, and check
    that the runtime loads it. `sequence` is the signed anti-rollback counter devices compare (default:
    build time in Unix seconds, so a later build always outranks an earlier one).

    The package is staged beside `out_dir` and renamed onto it (`edge.package.staged_package`); what was
    at `out_dir` must be a package or empty (`check_out_dir`), unless `force`. With `profile`, the staged
    package must also be served by the runtime on it (`check_it_serves`) before it is renamed in."""
    check_out_dir(out_dir, force)
    private_key = None
    if sign_key is not None:
        from edge.signing import load_private_key

        private_key = load_private_key(sign_key)
    with staged_package(out_dir) as root:
        artifacts = []
        for artifact in spec.artifacts:
            shutil.copyfile(artifact.source, root / artifact.name)
            info = describe_file(root, artifact.name)
            artifacts.append(
                Artifact(
                    **info,
                    format=artifact.format,
                    precision=artifact.precision,
                    quantization=artifact.quantization,
                    inputs=artifact.inputs,
                    outputs=artifact.outputs,
                )
            )
        (root / "golden").mkdir()
        golden_inputs = {s.name: np.concatenate([f[s.name] for f in spec.golden.feeds]) for s in spec.inputs}
        golden_outputs = {
            o.name: np.concatenate([sample[i] for sample in spec.golden.outputs])
            for i, o in enumerate(spec.outputs)
        }
        # Numeric arrays only, as the runtime loads them (np.load refuses pickles).
        np.savez(root / "golden" / "inputs.npz", allow_pickle=False, **golden_inputs)
        np.savez(root / "golden" / "outputs.npz", allow_pickle=False, **golden_outputs)
        labels_name = None
        if spec.labels:
            labels_name = "labels.txt"
            (root / labels_name).write_text("\n".join(spec.labels) + "\n", encoding="utf-8")
        for relative, source in spec.extra_files.items():
            target = root / relative
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        manifest = Manifest(
            name=spec.name,
            version=f"{time.strftime('%Y.%m.%d', time.gmtime())}+{git_short_hash()}",
            created=utc_now(),
            task=spec.task,
            artifacts=artifacts,
            inputs=spec.inputs,
            outputs=spec.outputs,
            postprocess=spec.postprocess,
            labels=labels_name,
            pruning=spec.pruning,
            metrics=spec.metrics,
            golden=Golden(
                inputs="golden/inputs.npz", outputs="golden/outputs.npz", tolerance=spec.golden.tolerance
            ),
            profile=spec.profile,
            text=spec.text,
            constants=spec.constants,
            state=spec.state,
            sequence=int(time.time()) if sequence is None else sequence,
        )
        write_manifest(root, manifest, sign_key=private_key)
        package = load_package(root)  # refuse to publish anything the runtime would refuse
        if profile is not None:
            check_it_serves(package, profile, out_dir)
        check_out_dir(out_dir, force)  # again: files may have appeared there while the package was staged
    return manifest
