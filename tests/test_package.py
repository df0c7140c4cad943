import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge.errors import PackageError
from edge.package import (
    Artifact,
    Manifest,
    TensorSpec,
    describe_file,
    extract_archive,
    load_package,
    staged_package,
    utc_now,
    write_manifest,
)
from edge.signing import generate_keypair, load_private_key, load_public_key


def make_package(root: Path, sign_key: bytes | None = None) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(64))
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "golden").mkdir()
    np.savez(root / "golden/inputs.npz", input=np.zeros((1, 3, 4, 4), np.float32))
    np.savez(root / "golden/outputs.npz", logits=np.zeros((1, 2), np.float32))
    manifest = Manifest.model_validate(
        {
            "name": "tiny",
            "version": "1.0.0",
            "created": utc_now(),
            "task": "classification",
            "artifacts": [Artifact(format="onnx", precision="fp32", **describe_file(root, "model.onnx"))],
            "inputs": [TensorSpec(name="input", shape=[1, 3, 4, 4], layout="NCHW", color="RGB")],
            "outputs": [TensorSpec(name="logits", shape=[1, 2])],
            "labels": "labels.txt",
            "golden": {
                "inputs": "golden/inputs.npz",
                "outputs": "golden/outputs.npz",
                "tolerance": {"atol": 1e-4},
            },
        }
    )
    write_manifest(root, manifest, sign_key)
    return manifest


def test_roundtrip(tmp_path: Path):
    make_package(tmp_path / "pkg")
    pkg = load_package(tmp_path / "pkg")
    assert pkg.manifest.name == "tiny"
    assert pkg.labels() == ["cat", "dog"]
    data = json.loads((tmp_path / "pkg/manifest.json").read_text())
    assert data["schema"] == "edge.package/1"
    assert data["artifacts"][0]["sha256"] == pkg.manifest.artifacts[0].sha256


def test_wrong_sha256_is_refused(tmp_path: Path):
    make_package(tmp_path / "pkg")
    blob = bytearray((tmp_path / "pkg/model.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "pkg/model.onnx").write_bytes(bytes(blob))
    with pytest.raises(PackageError, match=r"artifacts\[0\]: sha256 of 'model.onnx'"):
        load_package(tmp_path / "pkg")


def test_truncated_artifact_is_refused(tmp_path: Path):
    make_package(tmp_path / "pkg")
    blob = (tmp_path / "pkg/model.onnx").read_bytes()
    (tmp_path / "pkg/model.onnx").write_bytes(blob[:10])
    with pytest.raises(PackageError, match="truncated"):
        load_package(tmp_path / "pkg")


def test_missing_file_is_refused(tmp_path: Path):
    make_package(tmp_path / "pkg")
    (tmp_path / "pkg/golden/outputs.npz").unlink()
    with pytest.raises(PackageError, match="golden.outputs: file 'golden/outputs.npz' is missing"):
        load_package(tmp_path / "pkg")


@pytest.mark.parametrize("evil", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_paths_escaping_the_package_are_refused(tmp_path: Path, evil: str):
    make_package(tmp_path / "pkg")
    manifest = json.loads((tmp_path / "pkg/manifest.json").read_text())
    manifest["artifacts"][0]["path"] = evil
    (tmp_path / "pkg/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="artifacts"):
        load_package(tmp_path / "pkg")


def test_symlink_out_of_the_package_is_refused(tmp_path: Path):
    make_package(tmp_path / "pkg")
    outside = tmp_path / "outside.onnx"
    os.replace(tmp_path / "pkg/model.onnx", outside)
    (tmp_path / "pkg/model.onnx").symlink_to(outside)
    with pytest.raises(PackageError, match="resolves outside the package"):
        load_package(tmp_path / "pkg")


def test_unknown_schema_is_refused(tmp_path: Path):
    make_package(tmp_path / "pkg")
    manifest = json.loads((tmp_path / "pkg/manifest.json").read_text())
    manifest["schema"] = "edge.package/2"
    (tmp_path / "pkg/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="schema: unsupported 'edge.package/2'"):
        load_package(tmp_path / "pkg")


def test_not_a_package(tmp_path: Path):
    with pytest.raises(PackageError, match="not found"):
        load_package(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(tmp_path)


def test_signature_is_checked_with_a_trusted_key(tmp_path: Path):
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    make_package(tmp_path / "pkg", sign_key=load_private_key(tmp_path / "k.pem"))
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    assert load_package(tmp_path / "pkg", [load_public_key(tmp_path / "k.pub")]).signed
    with pytest.raises(PackageError, match="signature does not match"):
        load_package(tmp_path / "pkg", [load_public_key(tmp_path / "other.pub")])
    # Tampering with the manifest after signing breaks the signature.
    text = (tmp_path / "pkg/manifest.json").read_text().replace('"1.0.0"', '"9.0.0"')
    (tmp_path / "pkg/manifest.json").write_text(text)
    with pytest.raises(PackageError, match="signature does not match"):
        load_package(tmp_path / "pkg", [load_public_key(tmp_path / "k.pub")])


def test_unsigned_package_refused_when_a_key_is_trusted(tmp_path: Path):
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    make_package(tmp_path / "pkg")
    with pytest.raises(PackageError, match="not signed"):
        load_package(tmp_path / "pkg", [load_public_key(tmp_path / "k.pub")])


def test_staged_package_is_all_or_nothing(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_package(out) as stage:
        (stage / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with staged_package(out) as stage:
        make_package(stage)
    assert load_package(out).manifest.name == "tiny"


def test_staged_package_replaces_by_rename_even_beside_a_stale_old_directory(tmp_path: Path):
    import os

    out = tmp_path / "out"
    with staged_package(out) as stage:
        make_package(stage)
    stale = tmp_path / f".out.old-{os.getpid()}"  # what a killed earlier run of this pid would leave
    stale.mkdir()
    (stale / "keep").write_text("x")
    with staged_package(out) as stage:
        make_package(stage)
        (stage / "second").write_text("2")
    assert (out / "second").is_file() and load_package(out).manifest.name == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "out"]


def test_staged_package_gets_the_mode_a_plain_mkdir_would(tmp_path: Path):
    import os

    # mkdtemp makes the staging directory 0700; renamed into place as it is, a package written by an
    # operator could not be read by the daemon's own user (systemd User=edge-infer).
    mask = os.umask(0o022)
    try:
        with staged_package(tmp_path / "out") as stage:
            make_package(stage)
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


def test_archive_roundtrip_and_refusals(tmp_path: Path):
    make_package(tmp_path / "pkg")
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        tar.add(tmp_path / "pkg", arcname="pkg")
    root = extract_archive(good, tmp_path / "x")
    assert load_package(root).manifest.name == "tiny"

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "pkg/labels.txt", arcname="../labels.txt")
    with pytest.raises(PackageError, match="outside the package"):
        extract_archive(evil, tmp_path / "y")

    linked = tmp_path / "link.tar"
    info = tarfile.TarInfo("pkg/model.onnx")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    with tarfile.open(linked, "w") as tar:
        tar.addfile(info)
    with pytest.raises(PackageError, match="link or device"):
        extract_archive(linked, tmp_path / "z")

    with pytest.raises(PackageError, match="bytes \\(limit 10\\)"):
        extract_archive(good, tmp_path / "w", max_member_bytes=10)
