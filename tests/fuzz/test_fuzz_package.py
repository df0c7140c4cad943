"""Model packages (edge/package.py): mutated manifests and hostile archives are refused in one line.

A manifest may point anywhere (`..`, absolute paths, symlinks out of the package, NUL bytes, huge
sizes); `load_package` must either verify a package whose every file lies inside its directory or raise
`PackageError` naming the manifest. `extract_archive` must never write outside its destination.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given, note
from hypothesis import strategies as st

from edge.errors import PackageError
from edge.package import MANIFEST, Package, extract_archive, load_package, parse_manifest
from tests.fuzz.strategies import NASTY_VALUES, damaged_bytes, mutated
from tests.fuzz.support import TEST_TIMEOUT_S, assert_clear_error, fuzz_settings, no_hang, with_field

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

MODEL = b"\x08\x07not really onnx" * 10
HOSTILE_PATHS = [
    "../outside/secret.onnx",
    "/etc/passwd",
    "link.onnx",
    "loop",
    "a/../../outside/secret.onnx",
    "./model.onnx",
    "model.onnx/",
    "model.onnx\x00",
    "model\ud800.onnx",
    "modèle.onnx",
    "a" * 5000,
    "a/" * 3000 + "x",
    "",
    ".",
    "golden",
    "C:\\Windows\\x",
    "\\\\server\\share",
    "~/x",
    "model.onnx ",
    "labels.txt",
]


def valid_manifest() -> dict[str, Any]:
    return {
        "schema": "edge.package/1",
        "name": "tiny",
        "version": "1.0.0",
        "created": "2026-11-23T00:00:00Z",
        "task": "classification",
        "artifacts": [
            {
                "path": "model.onnx",
                "format": "onnx",
                "precision": "fp32",
                "sha256": hashlib.sha256(MODEL).hexdigest(),
                "bytes": len(MODEL),
            }
        ],
        "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "layout": "NCHW", "mean": [0.5], "std": [0.5]}],
        "outputs": [{"name": "logits", "shape": [1, 4]}],
        "labels": "labels.txt",
        "golden": {
            "inputs": "golden/inputs.npz",
            "outputs": "golden/outputs.npz",
            "tolerance": {"atol": 0.01},
        },
        "sequence": 3,
    }


VALID = valid_manifest()


def make_package(sandbox: Path, manifest: bytes, labels: bytes = b"red\ngreen\nblue\ngray\n") -> Path:
    """A package directory beside an `outside/` directory it must never reach."""
    root = sandbox / "pkg"
    (root / "golden").mkdir(parents=True)
    (sandbox / "outside").mkdir()
    (sandbox / "outside" / "secret.onnx").write_bytes(MODEL)
    (root / "model.onnx").write_bytes(MODEL)
    (root / "labels.txt").write_bytes(labels)
    (root / "golden" / "inputs.npz").write_bytes(b"npz")
    (root / "golden" / "outputs.npz").write_bytes(b"npz")
    (root / "link.onnx").symlink_to(sandbox / "outside" / "secret.onnx")
    (root / "loop").symlink_to("loop")
    (root / MANIFEST).write_bytes(manifest)
    return root


def check_package(manifest: bytes, labels: bytes | None = None) -> Package | str:
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        root = make_package(sandbox, manifest, *(() if labels is None else (labels,)))
        try:
            with no_hang():
                package = load_package(root)
                package.labels()
        except PackageError as exc:
            message = assert_clear_error(exc)
            assert message.startswith(str(root)), message
            return message
        inside = root.resolve()
        relatives = [a.path for a in package.manifest.artifacts]
        relatives += [p for p in (package.manifest.labels,) if p]
        if package.manifest.golden:
            relatives += [package.manifest.golden.inputs, package.manifest.golden.outputs]
        for relative in relatives:
            target = (root / relative).resolve()
            assert inside in target.parents, f"{relative!r} resolves to {target}, outside the package"
        return package


def test_the_valid_package_loads() -> None:
    package = check_package(json.dumps(VALID).encode())
    assert isinstance(package, Package) and package.manifest.sequence == 3


@fuzz_settings(100)
@given(st.data())
def test_mutated_manifest(data: st.DataObject) -> None:
    document, notes = data.draw(mutated(VALID))
    note(notes)
    check_package(json.dumps(document).encode("utf-8", "surrogatepass"))


@fuzz_settings(100)
@given(
    st.sampled_from(["artifacts.0.path", "labels", "golden.inputs", "golden.outputs"]),
    st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=30)),
)
@example("artifacts.0.path", "model.onnx\x00").via("regression: ValueError (NUL byte) from Path.resolve")
@example("artifacts.0.path", "model\ud800.onnx").via("regression: UnicodeEncodeError from Path.resolve")
@example("artifacts.0.path", "loop").via("regression: RuntimeError (symlink loop) from Path.resolve")
@example("labels", "a" * 5000).via("regression: OSError (file name too long) from Path.is_file")
@example("artifacts.0.path", "link.onnx").via("a symlink out of the package is refused")
def test_hostile_paths_never_leave_the_package(field: str, path: str) -> None:
    document = with_field(VALID, field, path)
    result = check_package(json.dumps(document).encode("utf-8", "surrogatepass"))
    if path in ("../outside/secret.onnx", "/etc/passwd", "link.onnx", "a/../../outside/secret.onnx"):
        assert isinstance(result, str), f"{path!r} was accepted"


@fuzz_settings(80)
@given(st.sampled_from(["bytes", "sequence", "sha256", "artifacts.0.bytes"]), NASTY_VALUES)
def test_wrong_sizes_and_hashes(field: str, value: Any) -> None:
    document: Any = copy.deepcopy(VALID)
    if field == "bytes":
        document["artifacts"][0]["bytes"] = value
    elif field == "sha256":
        document["artifacts"][0]["sha256"] = value
    elif field == "sequence":
        document["sequence"] = value
    else:
        document["artifacts"][0]["bytes"] = value if not isinstance(value, int) else value + len(MODEL)
    result = check_package(json.dumps(document).encode())
    if isinstance(result, Package):
        assert result.manifest.artifacts[0].bytes == len(MODEL)


@fuzz_settings(100)
@given(
    st.one_of(
        st.binary(max_size=300),
        damaged_bytes(json.dumps(VALID, indent=1)),
        st.sampled_from([b"null", b"[]", b'"x"', b"{}", b'{"schema": null}', "\ufeff{}".encode()]),
    )
)
@example(b"1" * 5000).via("regression: a 5000-digit number escaped as ValueError")
@example(b"[" * 100000).via("regression: deep nesting escaped as RecursionError")
def test_damaged_manifest_bytes(raw: bytes) -> None:
    check_package(raw)


@fuzz_settings(60)
@given(st.binary(max_size=200))
@example(b"\xff").via("regression: labels that are not UTF-8 raised UnicodeDecodeError")
def test_labels_of_any_bytes(labels: bytes) -> None:
    result = check_package(json.dumps(VALID).encode(), labels=labels)
    if isinstance(result, str):
        assert "labels" in result, result


def test_parse_manifest_names_the_file() -> None:
    with pytest.raises(PackageError) as info:
        parse_manifest(b"\xff", Path("/x/manifest.json"))
    assert_clear_error(info.value, "/x/manifest.json")


# -- archives -----------------------------------------------------------------------------------------

MEMBER_NAMES = st.one_of(
    st.sampled_from(
        [
            "manifest.json",
            "pkg/manifest.json",
            "model.onnx",
            "../escape.txt",
            "../../escape.txt",
            "/tmp/escape.txt",
            "a/../../escape.txt",
            "./x",
            ".",
            "pkg",
            "pkg/",
            "é/ü.txt",
            "a" * 300,
            "x\\..\\..\\escape.txt",
        ]
    ),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=20),
)
MEMBERS = st.lists(
    st.tuples(
        MEMBER_NAMES,
        st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo", "chardev"]),
        st.sampled_from(["../outside", "/etc/passwd", "manifest.json", "x"]),
        st.binary(max_size=64),
    ),
    max_size=6,
)


def build_tar(members: list[tuple[str, str, str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link, content in members:
            info = tarfile.TarInfo(name)
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chardev": tarfile.CHRTYPE,
            }[kind]
            info.linkname = link
            if kind == "file":
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def snapshot(root: Path, skip: Path) -> dict[str, bytes | None]:
    seen: dict[str, bytes | None] = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        seen[str(path)] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return seen


@fuzz_settings(100)
@given(MEMBERS, st.data())
@example([(".", "file", "x", b"")], None).via("regression: a file member named `.` raised IsADirectoryError")
def test_archives_never_write_outside_the_destination(
    members: list[tuple[str, str, str, bytes]], data: st.DataObject
) -> None:
    try:
        archive_bytes = build_tar(members)
    except (ValueError, UnicodeError, tarfile.TarError):
        assume(False)
    if data is not None and data.draw(st.booleans()):  # damage it: truncated, bytes flipped or spliced
        archive_bytes = (
            data.draw(damaged_bytes(archive_bytes.decode("latin-1")))
            .decode("utf-8", "replace")
            .encode("latin-1", "replace")
        )
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp) / "sandbox"
        (sandbox / "outside").mkdir(parents=True)
        (sandbox / "outside" / "sentinel").write_text("untouched")
        archive = sandbox / "pkg.tar"
        archive.write_bytes(archive_bytes)
        dest = sandbox / "dest"
        before = snapshot(Path(tmp), dest)
        try:
            with no_hang():
                root = extract_archive(archive, dest)
        except PackageError as exc:
            assert_clear_error(exc, str(archive))
        else:
            assert root == dest or dest in root.parents
            assert (root / MANIFEST).is_file()
        assert snapshot(Path(tmp), dest) == before, "something was written outside the destination"
        for path in dest.rglob("*") if dest.exists() else []:
            assert not path.is_symlink() and dest.resolve() in path.resolve().parents, path
            assert path.is_file() or path.is_dir(), f"{path} is a device, fifo or link"


@example(b"")
@example(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
@given(st.binary(max_size=1024))
@fuzz_settings(100)
def test_random_bytes_as_an_archive(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "pkg.tar"
        archive.write_bytes(raw)
        with pytest.raises(PackageError) as info, no_hang():
            extract_archive(archive, Path(tmp) / "dest")
        assert_clear_error(info.value, str(archive))


def test_missing_archive_is_a_package_error(tmp_path: Path) -> None:
    """Regression: tarfile's FileNotFoundError escaped."""
    with pytest.raises(PackageError) as info:
        extract_archive(tmp_path / "nope.tar", tmp_path / "dest")
    assert_clear_error(info.value, str(tmp_path / "nope.tar"))


assert os.sep == "/"  # the hostile paths above are POSIX ones
