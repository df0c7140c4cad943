"""The model package: a directory (or .tar) with `manifest.json`, artifacts, labels and golden data.

Schema `edge.package/1` (docs/contracts.md). Loading verifies every artifact's sha256 and size, refuses paths
that leave the package directory, and checks an ed25519 signature over the manifest bytes when a trusted
key is given. Writing is atomic: a temp directory beside the target, renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from edge.errors import PackageError
from edge.processing.text import TextConfig
from edge.tasks.base import TaskConfig
from edge.tasks.registry import PostprocessConfig, explain, task_keys

SCHEMA = "edge.package/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_ARCHIVE_MEMBER_BYTES = 2 << 30
MAX_ARCHIVE_BYTES = 4 << 30  # all members together: a tar bomb must not fill the models directory


class _Model(BaseModel):
    # Unknown keys are kept (forward compatible readers), but known ones are typed.
    model_config = ConfigDict(extra="allow")


class Calibration(_Model):
    method: Literal["minmax", "percentile", "entropy", "none"] = "minmax"
    samples: int = Field(default=0, ge=0)


class Quantization(_Model):
    scheme: str = "qdq"
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: int8 kernels without VNNI cannot overflow
    bias_correction: bool = False  # float biases absorb the mean shift that weight rounding causes
    calibration: Calibration = Field(default_factory=Calibration)
    excluded_nodes: list[str] = Field(default_factory=list)


class TensorSpec(_Model):
    name: str
    shape: list[int | str]
    dtype: str = "float32"
    layout: Literal["NCHW", "NHWC", "NC", "NTC", "NCT", "any"] | None = None
    color: Literal["RGB", "BGR", "GRAY"] | None = None
    resize: Literal["center-crop", "letterbox", "stretch"] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    # Quantized tensors (an int8 TFLite's uint8/int8 inputs/outputs): real = scale * (q - zero_point)
    scale: float | None = None
    zero_point: int | None = None


class Artifact(_Model):
    path: str
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8", "mixed"]
    sha256: str
    bytes: int = Field(ge=0)
    quantization: Quantization | None = None
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 lowercase hex digits")
        return value


class ConstantInput(_Model):
    """An input that is not the data: fed the same value every run (`edge-convert --const NAME=VALUE`),
    broadcast to the input's shape and dtype."""

    name: str
    value: float


class StateLink(_Model):
    """Recurrent state (`edge-convert --state IN:OUT`): output `output` of one run is input `input` of the
    next run on the same stream; zeros at the start of a stream."""

    input: str
    output: str


class Golden(_Model):
    inputs: str
    outputs: str
    # Per-output tolerance, e.g. {"atol": 0.05, "cosine": 0.99}; the runtime compares backends with it.
    tolerance: dict[str, float] = Field(default_factory=dict)


if TYPE_CHECKING:
    TaskKey = str
else:
    TaskKey = Literal[task_keys()]  # every task edge.tasks serves


class Manifest(_Model):
    schema_: Literal["edge.package/1"] = Field(default="edge.package/1", alias="schema")
    name: str
    version: str
    created: str
    task: TaskKey
    artifacts: list[Artifact] = Field(min_length=1)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    # Typed per task (edge.tasks); without `type` it is the manifest's task, so `{}` or no key at all
    # means that task's defaults.
    postprocess: PostprocessConfig
    labels: str | None = None
    # Text models: the tokenizer file (hashed, so the signature covers it) and how texts become tokens.
    text: TextConfig | None = None
    pruning: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    golden: Golden | None = None
    profile: str | None = None
    constants: list[ConstantInput] = Field(default_factory=list)
    state: list[StateLink] = Field(default_factory=list)
    # Monotonic counter in the signed manifest, so a device can refuse rollbacks to older packages.
    sequence: int = Field(default=0, ge=0)

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _postprocess_type_defaults_to_task(cls, data: object) -> object:
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            return data
        post = data.get("postprocess", {})
        if isinstance(post, dict) and "type" not in post:
            return {**data, "postprocess": {**post, "type": data["task"]}}
        return data

    @model_validator(mode="after")
    def _constants_and_state_name_tensors(self) -> Manifest:
        inputs = {spec.name for spec in self.inputs}
        outputs = {spec.name for spec in self.outputs}
        for const in self.constants:
            if const.name not in inputs:
                raise ValueError(f"constants: '{const.name}' is not an input (inputs: {sorted(inputs)})")
        for link in self.state:
            if link.input not in inputs:
                raise ValueError(f"state: '{link.input}' is not an input (inputs: {sorted(inputs)})")
            if link.output not in outputs:
                raise ValueError(f"state: '{link.output}' is not an output (outputs: {sorted(outputs)})")
        if not self.data_inputs:
            raise ValueError("every input is a constant or state: the model has no data input")
        return self

    @property
    def data_inputs(self) -> list[TensorSpec]:
        """The inputs a caller feeds: neither constants nor recurrent state."""
        fed = {c.name for c in self.constants} | {link.input for link in self.state}
        return [spec for spec in self.inputs if spec.name not in fed]

    @field_serializer("postprocess")
    def _postprocess_as_written(self, config: TaskConfig) -> dict[str, object]:
        # Only what was stated: a manifest keeps the shape its writer gave it, defaults stay implicit.
        return config.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def artifact(self, fmt: str | None = None, precision: str | None = None) -> Artifact:
        for artifact in self.artifacts:
            if (fmt is None or artifact.format == fmt) and (
                precision is None or artifact.precision == precision
            ):
                return artifact
        raise PackageError(f"package '{self.name}' has no artifact with format={fmt} precision={precision}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), indent=2, sort_keys=False) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def safe_member(root: Path, relative: str, what: str) -> Path:
    """`root/relative`, refused if it is absolute, climbs out with `..`, or resolves (symlinks) outside."""
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise PackageError(f"{root / MANIFEST}: {what}: path '{relative}' must be relative to the package")
    if ".." in Path(relative).parts:
        raise PackageError(f"{root / MANIFEST}: {what}: path '{relative}' leaves the package directory")
    try:
        os.fsencode(relative)
        resolved_root = root.resolve()
        target = (root / relative).resolve()
    except (ValueError, RuntimeError, OSError) as exc:  # NUL byte, lone surrogate, symlink loop
        raise PackageError(f"{root / MANIFEST}: {what}: path {relative!r} is unusable: {exc}") from exc
    if target != resolved_root and resolved_root not in target.parents:
        raise PackageError(f"{root / MANIFEST}: {what}: path '{relative}' resolves outside the package")
    return target


@dataclass(frozen=True)
class Package:
    """A verified package on disk."""

    root: Path
    manifest: Manifest
    manifest_sha256: str
    signed: bool

    def path(self, relative: str) -> Path:
        return safe_member(self.root, relative, "path")

    def labels(self) -> list[str]:
        if not self.manifest.labels:
            return []
        path = self.path(self.manifest.labels)
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PackageError(f"{self.root / MANIFEST}: labels: cannot read '{path.name}': {exc}") from exc


def parse_manifest(raw: bytes, where: Path) -> Manifest:
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError and a number over the int digit limit
        raise PackageError(f"{where}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise PackageError(f"{where}: not valid JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{where}: expected a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise PackageError(f"{where}: schema: unsupported '{schema}' (this runtime reads {SCHEMA})")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field, message = (
            explain(err)
            if err["loc"][:1] == ("postprocess",)
            else (".".join(map(str, err["loc"])), err["msg"])
        )
        raise PackageError(f"{where}: {field}: {message}") from exc


def load_package(path: str | Path, trusted_keys: list[bytes] | None = None) -> Package:
    """Load and verify a package directory. With `trusted_keys` (raw ed25519 public keys), a valid
    signature by one of them is required."""
    root = Path(path)
    if is_archive(root):
        raise PackageError(f"{root}: is an archive; open it with `package_dir` or `unpack_into` first")
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError as exc:
        raise PackageError(f"{manifest_path}: not found (is '{root}' a model package?)") from exc
    except OSError as exc:
        raise PackageError(f"{manifest_path}: cannot read: {exc.strerror}") from exc
    manifest = parse_manifest(raw, manifest_path)

    signed = False
    sig_path = root / SIGNATURE
    if trusted_keys is not None:
        from edge.signing import verify_signature

        if not sig_path.is_file():
            raise PackageError(f"{sig_path}: package is not signed, and a trusted key is configured")
        verify_signature(raw, sig_path.read_bytes(), trusted_keys, where=sig_path)
        signed = True

    for index, artifact in enumerate(manifest.artifacts):
        _verify_file(root, artifact.path, artifact.sha256, artifact.bytes, f"artifacts[{index}]")
    if manifest.text is not None:
        _verify_file(
            root, manifest.text.tokenizer, manifest.text.sha256, manifest.text.bytes, "text.tokenizer"
        )
    for relative, what in _referenced_files(manifest):
        target = safe_member(root, relative, what)
        if not _is_file(target):
            raise PackageError(f"{manifest_path}: {what}: file '{relative}' is missing")
    return Package(
        root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest(), signed=signed
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # ENAMETOOLONG and friends: not a file the package can have
        return False


def _referenced_files(manifest: Manifest) -> Iterator[tuple[str, str]]:
    if manifest.labels:
        yield manifest.labels, "labels"
    if manifest.golden:
        yield manifest.golden.inputs, "golden.inputs"
        yield manifest.golden.outputs, "golden.outputs"


def _verify_file(root: Path, relative: str, sha256: str, size: int, what: str) -> None:
    target = safe_member(root, relative, what)
    try:
        is_file = target.is_file()
        actual_size = target.stat().st_size if is_file else 0
    except OSError as exc:  # a name too long for the file system, an unreadable directory
        raise PackageError(f"{root / MANIFEST}: {what}: cannot stat '{relative}': {exc.strerror}") from exc
    if not is_file:
        raise PackageError(f"{root / MANIFEST}: {what}: file '{relative}' is missing")
    if actual_size != size:
        raise PackageError(
            f"{root / MANIFEST}: {what}: '{relative}' is {actual_size} bytes, manifest says {size} (truncated?)"
        )
    try:
        actual = sha256_file(target)
    except OSError as exc:
        raise PackageError(f"{root / MANIFEST}: {what}: cannot read '{relative}': {exc.strerror}") from exc
    if actual != sha256:
        raise PackageError(
            f"{root / MANIFEST}: {what}: sha256 of '{relative}' is {actual[:12]}…, "
            f"manifest says {sha256[:12]}…"
        )


def describe_file(root: Path, relative: str) -> dict[str, Any]:
    """The `path`, `sha256` and `bytes` fields for an artifact already inside `root`."""
    target = safe_member(root, relative, "artifact")
    return {"path": relative, "sha256": sha256_file(target), "bytes": target.stat().st_size}


@contextmanager
def staged_package(out_dir: Path) -> Iterator[Path]:
    """A temp directory beside `out_dir`, renamed onto it only if the block finishes without error.

    A failed conversion therefore never leaves a half-written package; an existing package at `out_dir`
    is replaced only at the very end (moved aside, then removed).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    # mkdtemp's 0700 would travel with the rename: give the package the mode a plain mkdir gives, so
    # that the daemon's own user can read a package an operator wrote.
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        _fsync_tree(staging)
        old: Path | None = None
        if out_dir.exists():
            # A fresh empty directory as the name to move onto: rename(2) replaces an empty directory,
            # so a stale `.old-` left by a killed run can never make this fail or be mistaken for ours.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)  # put the previous package back: nothing is lost
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_manifest(root: Path, manifest: Manifest, sign_key: bytes | None = None) -> None:
    """Write `manifest.json` (and `manifest.sig` when given a raw ed25519 private key)."""
    text = manifest.to_json().encode("utf-8")
    (root / MANIFEST).write_bytes(text)
    if sign_key is not None:
        from edge.signing import sign

        (root / SIGNATURE).write_bytes(sign(text, sign_key))


def extract_archive(
    archive: Path,
    dest: Path,
    max_member_bytes: int = MAX_ARCHIVE_MEMBER_BYTES,
    max_total_bytes: int = MAX_ARCHIVE_BYTES,
) -> Path:
    """Unpack a package .tar into `dest`, refusing `..`, absolute paths, links, devices, huge members and
    archives that unpack to more than `max_total_bytes`."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            total = sum(member.size for member in members)
            if total > max_total_bytes:
                raise PackageError(f"{archive}: unpacks to {total} bytes (limit {max_total_bytes})")
            for member in members:
                name = member.name
                if os.path.isabs(name) or ".." in Path(name).parts:
                    raise PackageError(f"{archive}: member '{name}' would be written outside the package")
                if not (member.isfile() or member.isdir()):
                    raise PackageError(
                        f"{archive}: member '{name}' is a link or device; only files are allowed"
                    )
                if member.size > max_member_bytes:
                    raise PackageError(
                        f"{archive}: member '{name}' is {member.size} bytes (limit {max_member_bytes})"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise PackageError(f"{archive}: not a readable tar archive: {exc}") from exc
    except (OSError, EOFError) as exc:  # missing file, a truncated gzip, a member `.` that is a file
        raise PackageError(f"{archive}: cannot unpack: {getattr(exc, 'strerror', None) or exc}") from exc
    roots = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
    if (dest / MANIFEST).is_file():
        return dest
    if len(roots) == 1 and (dest / next(iter(roots)) / MANIFEST).is_file():
        return dest / next(iter(roots))
    raise PackageError(f"{archive}: no {MANIFEST} at the top of the archive")


def is_archive(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def unpack_into(archive: Path, models_dir: Path) -> Path:
    """A package .tar unpacked (safely, see `extract_archive`) into a directory of its own in
    `models_dir`, named by its manifest and the manifest's hash, so the same archive given again is found
    rather than unpacked twice. Staged beside and renamed in: a half-unpacked package is never seen."""
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=models_dir))
    try:
        root = extract_archive(archive, staging)
        text = (root / MANIFEST).read_bytes()
        try:
            manifest = json.loads(text)
            name, version = str(manifest["name"]), str(manifest["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{archive}: {MANIFEST} has no name and version: {exc}") from exc
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{name}-{version}")
        target = models_dir / f"{safe}-{hashlib.sha256(text).hexdigest()[:12]}"
        if not target.exists():
            os.rename(root, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def package_dir(path: str | Path) -> Iterator[Path]:
    """A package directory as it is, or a package .tar unpacked into a temporary directory for the
    length of the block (`bench`, `doctor`: nothing is left behind)."""
    path = Path(path)
    if not is_archive(path):
        if not path.is_dir():
            raise PackageError(f"{path}: neither a package directory nor a package .tar")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="edge-package-") as tmp:
        yield unpack_into(path, Path(tmp))
