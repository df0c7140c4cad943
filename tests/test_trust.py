"""Trust policy: signed packages only, no rollback (persisted), model paths confined to the models dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edge.errors import ConfigError, PackageError
from edge.package import Artifact, Manifest, TensorSpec, describe_file, load_package, utc_now, write_manifest
from edge.signing import generate_keypair, load_private_key, load_public_key
from edge.trust import TrustPolicy, check_model_path, check_secret_file


def make_package(root: Path, sequence: int, sign_key: bytes | None) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(256))
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "golden").mkdir()
    np.savez(root / "golden/inputs.npz", input=np.zeros((1, 3, 4, 4), np.float32))
    np.savez(root / "golden/outputs.npz", logits=np.zeros((1, 2), np.float32))
    manifest = Manifest.model_validate(
        {
            "name": "tiny",
            "version": f"1.0.{sequence}",
            "created": utc_now(),
            "task": "classification",
            "sequence": sequence,
            "artifacts": [Artifact(format="onnx", precision="fp32", **describe_file(root, "model.onnx"))],
            "inputs": [TensorSpec(name="input", shape=[1, 3, 4, 4], layout="NCHW", color="RGB")],
            "outputs": [TensorSpec(name="logits", shape=[1, 2])],
            "labels": "labels.txt",
            "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        }
    )
    write_manifest(root, manifest, sign_key)
    return root


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for who in ("ours", "theirs"):
        generate_keypair(tmp_path / f"{who}.key", tmp_path / f"{who}.pub")
        out[f"{who}_private"] = load_private_key(tmp_path / f"{who}.key")
        out[f"{who}_public"] = load_public_key(tmp_path / f"{who}.pub")
    return out


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def policy_for(keys: dict[str, bytes], tmp_path: Path, models: Path) -> TrustPolicy:
    return TrustPolicy([keys["ours_public"]], tmp_path / "state")


def test_signed_package_is_accepted_and_its_sequence_persisted(tmp_path, keys, models):
    pkg_dir = make_package(models / "v5", 5, keys["ours_private"])
    policy = policy_for(keys, tmp_path, models)
    package = policy.load(pkg_dir)
    assert package.signed
    assert policy.highest_sequence() == 0  # nothing is recorded before the model actually serves
    policy.accept(package)
    state = json.loads((tmp_path / "state/trust.json").read_text())
    assert state["highest_sequence"] == 5
    assert state["manifest_sha256"] == package.manifest_sha256
    assert (tmp_path / "state/trust.json").stat().st_mode & 0o077 == 0  # written 0600 via mkstemp
    # A new policy object (a restarted daemon) reads the same floor.
    assert policy_for(keys, tmp_path, models).highest_sequence() == 5


def test_unsigned_package_is_refused_when_keys_are_configured(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, None)
    with pytest.raises(PackageError, match="not signed"):
        policy_for(keys, tmp_path, models).load(pkg_dir)


def test_package_loaded_without_keys_is_refused_by_check(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, keys["ours_private"])
    unverified = load_package(pkg_dir)  # signature not checked
    with pytest.raises(PackageError, match="not verified against the trusted keys"):
        policy_for(keys, tmp_path, models).check(unverified, None)


def test_package_signed_by_another_key_is_refused(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, keys["theirs_private"])
    with pytest.raises(PackageError, match="signature does not match"):
        policy_for(keys, tmp_path, models).load(pkg_dir)


def test_tampered_manifest_is_refused(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, keys["ours_private"])
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    manifest["sequence"] = 99  # an attacker bumping the counter invalidates the signature
    (pkg_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(PackageError, match="signature does not match"):
        policy_for(keys, tmp_path, models).load(pkg_dir)


def test_truncated_artifact_is_refused(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, keys["ours_private"])
    blob = (pkg_dir / "model.onnx").read_bytes()
    (pkg_dir / "model.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PackageError, match="truncated"):
        policy_for(keys, tmp_path, models).load(pkg_dir)


def test_rollback_is_refused_even_after_a_restart(tmp_path, keys, models):
    policy = policy_for(keys, tmp_path, models)
    policy.accept(policy.load(make_package(models / "v7", 7, keys["ours_private"])))
    older = make_package(models / "v6", 6, keys["ours_private"])
    with pytest.raises(PackageError, match=r"sequence 6 is lower than 7 .*rollback refused"):
        policy.load(older)
    restarted = policy_for(keys, tmp_path, models)
    with pytest.raises(PackageError, match="rollback refused"):
        restarted.load(older)
    # The same package again (a reload or a reboot) and a newer one are fine.
    restarted.load(models / "v7")
    newer = restarted.load(make_package(models / "v8", 8, keys["ours_private"]))
    restarted.accept(newer)
    assert restarted.highest_sequence() == 8


def test_rollback_below_the_running_model_is_refused_without_state(tmp_path, keys, models):
    policy = policy_for(keys, tmp_path, models)
    running = load_package(make_package(models / "v3", 3, keys["ours_private"]), [keys["ours_public"]])
    older = load_package(make_package(models / "v2", 2, keys["ours_private"]), [keys["ours_public"]])
    with pytest.raises(PackageError, match=r"lower than 3 running 'tiny' 1\.0\.3"):
        policy.check(older, running.manifest)


def test_damaged_state_fails_closed(tmp_path, keys, models):
    policy = policy_for(keys, tmp_path, models)
    (tmp_path / "state").mkdir()
    (tmp_path / "state/trust.json").write_text("{not json")
    with pytest.raises(PackageError, match="trust state is damaged"):
        policy.load(make_package(models / "v1", 1, keys["ours_private"]))


@pytest.mark.parametrize("bad", ["/etc", "../outside", "v1/../../outside", "link-out"])
def test_model_path_outside_the_models_dir_is_refused(tmp_path, keys, models, bad):
    (tmp_path / "outside").mkdir()
    make_package(tmp_path / "outside/pkg", 1, keys["ours_private"])
    (models / "link-out").symlink_to(tmp_path / "outside")
    with pytest.raises(PackageError, match="outside the models directory"):
        check_model_path(bad, models)


def test_model_path_inside_the_models_dir_resolves(tmp_path, keys, models):
    pkg_dir = make_package(models / "v1", 1, keys["ours_private"])
    (models / "current").symlink_to(pkg_dir)
    assert check_model_path("current", models) == pkg_dir.resolve()
    assert check_model_path(models / "v1", models) == pkg_dir.resolve()
    with pytest.raises(PackageError, match="outside the models directory"):
        check_model_path(models, models)


def test_world_readable_secret_is_refused(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mqtt.password_file: .* accessible by other users \(mode 0644\)"):
        check_secret_file(secret, "mqtt.password_file")
    secret.chmod(0o640)
    assert check_secret_file(secret, "mqtt.password_file") == secret
    with pytest.raises(ConfigError, match="does not exist"):
        check_secret_file(tmp_path / "missing", "mqtt.tls.keyfile")


def test_keygen_writes_a_usable_pair_and_never_overwrites(tmp_path, models, capsys):
    import argparse

    from edge import keygen

    parser = argparse.ArgumentParser()
    keygen.add_arguments(parser)
    args = parser.parse_args(["--private", str(tmp_path / "k.pem"), "--public", str(tmp_path / "k.pub")])
    assert keygen.main(args) == 0
    assert "key id" in capsys.readouterr().out
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    pkg_dir = make_package(models / "v1", 1, load_private_key(tmp_path / "k.pem"))
    policy = TrustPolicy([load_public_key(tmp_path / "k.pub")], tmp_path / "state")
    assert policy.load(pkg_dir).signed
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        keygen.main(args)
    assert (tmp_path / "k.pem").read_bytes() == before


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_onnx_external_data_outside_the_package_is_refused(tmp_path, how):
    # Model files are data: an ONNX initializer stored as "external data" must not read files outside the
    # package. onnxruntime enforces this itself; this guards the behaviour we rely on across ORT upgrades.
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    secret = tmp_path / "secret.bin"
    weights = np.arange(16, dtype=np.float32).reshape(4, 4)
    secret.write_bytes(weights.tobytes())
    package = tmp_path / "pkg"
    package.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[how]
    if how == "symlink":
        (package / "weights.bin").symlink_to(secret)
    initializer = numpy_helper.from_array(weights, "w")
    initializer.ClearField("raw_data")
    initializer.data_location = TensorProto.EXTERNAL
    entry = initializer.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "leak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [initializer],
    )
    model = package / "model.onnx"
    model.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    assert onnx.load(str(model), load_external_data=False).graph.initializer[0].data_location == 1
    with pytest.raises(Exception, match="External data path"):
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_rollback_is_allowed_only_to_the_package_accepted_before(tmp_path, keys, models):
    policy = policy_for(keys, tmp_path, models)
    v1 = policy.load(make_package(models / "v1", 1, keys["ours_private"]))
    policy.accept(v1)
    v2 = policy.load(make_package(models / "v2", 2, keys["ours_private"]), v1.manifest)
    policy.accept(v2)
    v3 = policy.load(make_package(models / "v3", 3, keys["ours_private"]), v2.manifest)
    policy.accept(v3)
    with pytest.raises(PackageError, match="only the package accepted before the current one"):
        policy.accept_rollback(v1)
    policy.accept_rollback(v2)
    assert policy.highest_sequence() == 3  # the floor stays
    restarted = policy_for(keys, tmp_path, models)
    assert restarted.load(models / "v2").manifest.sequence == 2  # exempt by its manifest hash
    with pytest.raises(PackageError, match="rollback refused"):
        restarted.load(models / "v1")
