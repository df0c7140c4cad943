"""The hardened unit: `systemd-analyze verify` and exposure score (tools/check_systemd.sh), the drop-in
examples, install.sh into a temp root (twice, then uninstall), and the ML stack under the same
seccomp filter systemd installs for MemoryDenyWriteExecute=yes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge.package import Artifact, Manifest, TensorSpec, describe_file, utc_now, write_manifest
from edge.signing import generate_keypair

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-infer.service"
CHECK = REPO / "tools" / "check_systemd.sh"
INSTALL = REPO / "systemd" / "install.sh"
DROP_INS = sorted((REPO / "systemd" / "drop-ins").glob("*.conf"))
THRESHOLD = 1.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, timeout=120)


def exposure(output: str) -> float:
    match = re.search(r"^exposure score: ([0-9.]+)", output, re.M)
    assert match, output
    return float(match.group(1))


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@needs_analyze
def test_unit_verifies_and_exposure_is_within_threshold():
    result = run_check("--threshold", str(THRESHOLD))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: OK" in result.stdout
    assert exposure(result.stdout) <= THRESHOLD


@needs_analyze
def test_check_fails_when_exposure_is_above_threshold():
    result = run_check("--threshold", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "security: FAILED" in result.stdout


@needs_analyze
def test_check_fails_on_a_broken_unit(tmp_path: Path):
    broken = tmp_path / "edge-infer.service"
    broken.write_text(UNIT.read_text().replace("Type=notify", "Type=notifyy"))
    result = run_check("--unit", str(broken))
    assert result.returncode == 1
    assert "verify: FAILED" in result.stdout


@needs_analyze
@pytest.mark.parametrize("drop_in", DROP_INS, ids=[p.stem for p in DROP_INS])
def test_drop_in_examples_verify(drop_in: Path):
    # Device drop-ins trade some exposure for hardware access; they must still be valid units.
    result = run_check("--drop-in", str(drop_in), "--threshold", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: OK" in result.stdout
    assert exposure(result.stdout) < 2.5


def test_unit_keeps_the_choices_documented_in_deploy_md():
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["DevicePolicy"] == ["closed"]
    assert "char-video4linux rw" in settings["DeviceAllow"]
    assert "video" in settings["SupplementaryGroups"][0].split()
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # Profile auto-detection reads /proc/cpuinfo, which ProcSubset=pid would hide.
    assert "ProcSubset" not in settings
    assert "DynamicUser" not in settings and settings["User"] == ["edge-infer"]


def test_stop_timeout_leaves_room_for_the_outbox_flush(tmp_path: Path):
    settings = unit_settings(UNIT.read_text())
    stop_timeout = float(settings["TimeoutStopSec"][0])
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["bash", str(INSTALL), "--root", str(root)], check=True, capture_output=True, text=True)
    config = (root / "etc/edge-infer/config.yaml").read_text()
    flush = float(re.search(r"^flush_timeout_s: ([0-9.]+)", config, re.M).group(1))  # type: ignore[union-attr]
    assert flush + 3 <= stop_timeout, "the daemon must finish draining before systemd sends SIGKILL"


def make_package(root: Path, sequence: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(128))
    (root / "golden").mkdir()
    np.savez(root / "golden/inputs.npz", input=np.zeros((1, 3, 4, 4), np.float32))
    np.savez(root / "golden/outputs.npz", logits=np.zeros((1, 2), np.float32))
    manifest = Manifest.model_validate(
        {
            "name": "tiny",
            "version": f"1.{sequence}",
            "created": utc_now(),
            "task": "classification",
            "sequence": sequence,
            "artifacts": [Artifact(format="onnx", precision="fp32", **describe_file(root, "model.onnx"))],
            "inputs": [TensorSpec(name="input", shape=[1, 3, 4, 4])],
            "outputs": [TensorSpec(name="logits", shape=[1, 2])],
            "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        }
    )
    write_manifest(root, manifest)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root -> (mode, content hash or link target)."""
    out: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.endswith(".pwd.lock"):
            continue
        mode = path.lstat().st_mode
        if path.is_symlink():
            out[rel] = (mode, "-> " + os.readlink(path))
        elif path.is_file():
            out[rel] = (mode, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = (mode, "dir")
    return out


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args], capture_output=True, text=True, timeout=120
    )


def test_install_twice_then_uninstall(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    package = make_package(tmp_path / "pkg", 3)
    generate_keypair(tmp_path / "signing.key", tmp_path / "signing.pub")
    args = ["--model", str(package), "--public-key", str(tmp_path / "signing.pub"), "--device-id", "cam-01"]

    first = install(root, *args, "--bin", "/opt/edge/bin/edge-infer", "--enable")
    assert first.returncode == 0, first.stderr
    unit = root / "etc/systemd/system/edge-infer.service"
    assert "ExecStart=/opt/edge/bin/edge-infer run --config %E/edge-infer/config.yaml" in unit.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-infer.service").is_symlink()
    assert (root / "usr/lib/sysusers.d/edge-infer.conf").is_file()
    assert (root / "usr/lib/tmpfiles.d/edge-infer.conf").is_file()
    if shutil.which("systemd-sysusers"):
        assert re.search(r"^edge-infer:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    config = root / "etc/edge-infer/config.yaml"
    assert "device_id: cam-01" in config.read_text()
    assert "trusted_keys: [/etc/edge-infer/trusted-keys/signing.pub]" in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "etc/edge-infer/trusted-keys/signing.pub").read_bytes() == (
        tmp_path / "signing.pub"
    ).read_bytes()
    models = root / "var/lib/edge-infer/models"
    assert os.readlink(models / "current") == "tiny-1.3"
    assert (models / "tiny-1.3/manifest.json").read_bytes() == (package / "manifest.json").read_bytes()
    assert (root / "var/lib/edge-infer").stat().st_mode & 0o777 == 0o700

    # The operator edits the config; a second run (same or newer model) must not touch it or `current`.
    config.write_text(config.read_text().replace("uri: /dev/video0", "uri: /dev/video2"))
    before = snapshot(root)
    second = install(root, *args, "--bin", "/opt/edge/bin/edge-infer", "--enable")
    assert second.returncode == 0, second.stderr
    assert "kept existing" in second.stdout
    assert snapshot(root) == before
    newer = install(
        root, "--model", str(make_package(tmp_path / "pkg2", 4)), "--bin", "/opt/edge/bin/edge-infer"
    )
    assert newer.returncode == 0, newer.stderr
    assert (models / "tiny-1.4/manifest.json").is_file()
    assert os.readlink(models / "current") == "tiny-1.3"
    assert "uri: /dev/video2" in config.read_text()

    removed = install(root, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edge-infer.service").exists()
    assert not (root / "usr/lib/sysusers.d/edge-infer.conf").exists()
    assert not (root / "usr/share/doc/edge-infer").exists()
    assert "uri: /dev/video2" in config.read_text()  # config and state are kept by default
    assert (models / "tiny-1.3/manifest.json").is_file()
    assert install(root, "--uninstall").returncode == 0  # uninstall is idempotent too

    purged = install(root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/edge-infer").exists() and not (root / "var/lib/edge-infer").exists()


def test_install_refuses_bad_input_without_writing(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    not_a_package = tmp_path / "empty"
    not_a_package.mkdir()
    result = install(root, "--model", str(not_a_package))
    assert result.returncode == 2
    assert "no manifest.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad_id = install(root, "--device-id", "cam/+/#")
    assert bad_id.returncode == 2 and "--device-id" in bad_id.stderr
    assert list(root.iterdir()) == []


def test_install_uses_the_given_config_and_never_replaces_it(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    given = tmp_path / "site.yaml"
    given.write_text("device_id: line-3\nmodel: /var/lib/edge-infer/models/current\nsource: {uri: 0}\n")
    assert install(root, "--config", str(given)).returncode == 0
    installed = root / "etc/edge-infer/config.yaml"
    assert installed.read_text() == given.read_text()
    given.write_text("device_id: line-4\n")
    again = install(root, "--config", str(given))
    assert again.returncode == 0 and "kept existing" in again.stdout
    assert "line-3" in installed.read_text()


def test_installed_starter_config_is_a_valid_daemon_config(tmp_path: Path):
    from edge.config import load_config

    root = tmp_path / "root"
    root.mkdir()
    assert install(root, "--device-id", "cam-07").returncode == 0
    config = load_config(root / "etc/edge-infer/config.yaml", environ={})
    assert config.device_id == "cam-07"
    assert config.model == Path("/var/lib/edge-infer/models/current")
    assert config.models_dir == Path("/var/lib/edge-infer/models")


# --- MemoryDenyWriteExecute=yes: what systemd's filter does to the ML stack -------------------------------

WX_REFUSED = textwrap.dedent(
    """
    import mmap, sys
    # The filter must really be active, or this test would prove nothing.
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping was allowed: the seccomp filter is not active")
    except PermissionError:
        print("wx-refused")
    """
)

PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
    weight = numpy_helper.from_array(np.random.default_rng(0).random((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.ones((1, 3, 32, 32), np.float32)})[0]
    print("onnxruntime", out.shape, bool(np.isfinite(out).all()))
    import cv2
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))
    print("opencv", cv2.resize(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), (32, 24)).shape)
    if len(sys.argv) > 1:
        from ai_edge_litert.interpreter import Interpreter
        interpreter = Interpreter(model_path=sys.argv[1], num_threads=2)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.ones(detail["shape"], detail["dtype"]))
        interpreter.invoke()
        result = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        print("litert", tuple(result.shape), bool(np.isfinite(result).all()))
    """
)


@pytest.fixture(scope="module")
def mdwe_exec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build tools/mdwe_exec.c")
    binary = tmp_path_factory.mktemp("mdwe") / "mdwe_exec"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(REPO / "tools/mdwe_exec.c")], check=True)
    return binary


def run_probe(mdwe_exec: Path, tmp_path: Path, *args: str) -> str:
    probe = tmp_path / "probe.py"
    probe.write_text(WX_REFUSED + PROBE)
    result = subprocess.run(
        [str(mdwe_exec), sys.executable, str(probe), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_onnxruntime_and_opencv_run_under_memory_deny_write_execute(mdwe_exec: Path, tmp_path: Path):
    out = run_probe(mdwe_exec, tmp_path)
    assert "wx-refused" in out
    assert "onnxruntime (1, 8, 32, 32) True" in out
    assert "opencv (24, 32, 3)" in out


@pytest.mark.slow
def test_litert_xnnpack_runs_under_memory_deny_write_execute(
    mdwe_exec: Path, tmp_path: Path, cache_dir: Path
):
    pytest.importorskip("ai_edge_litert")
    model = cache_dir / "mdwe_tiny_conv.tflite"
    if not model.exists():
        litert_torch = pytest.importorskip("litert_torch")
        import torch

        module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
        exported = litert_torch.convert(module, (torch.zeros(1, 3, 32, 32),))
        tmp_model = tmp_path / model.name
        exported.export(str(tmp_model))
        shutil.move(tmp_model, model)
    out = run_probe(mdwe_exec, tmp_path, str(model))
    assert "wx-refused" in out
    assert "litert (1, 8, 32, 32) True" in out


# --- SystemCallFilter=: every syscall the ML stack makes must be in the unit's allow list -----------------


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True)
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.stdout.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.startswith("    ") and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.split()[0])
    return groups


def unit_allowed_syscalls() -> set[str]:
    """The allow list the unit's SystemCallFilter= lines produce (first line allows, `~` lines remove)."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(member) for member in groups[name]))

    allowed: set[str] = set()
    for value in unit_settings(UNIT.read_text())["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_ml_stack_uses_only_syscalls_the_unit_allows(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), sys.executable, str(probe)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "onnxruntime (1, 8, 32, 32) True" in result.stdout
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert {"openat", "mmap", "futex"} <= used, "the trace is empty or unparsable"
    # SQLite fchown()s its WAL only when running as root (to keep the owner); the service never is root.
    root_only = {"fchown"} if os.geteuid() == 0 else set()
    denied = used - unit_allowed_syscalls() - root_only
    assert not denied, f"syscalls the unit's SystemCallFilter= would refuse (EPERM): {sorted(denied)}"
