"""Packages with inputs that are not the data: constants (`--const`) and recurrent state (`--state`),
served by real ORT sessions: state carried per stream, zeros at a stream's start, reset on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge import open_model
from edge.errors import PackageError
from edge.package import load_package
from tests.broker import Mosquitto
from tests.daemon_helpers import running_daemon, subscribed

PROFILE = "x86-64-avx2"


def accumulator_package(out_dir: Path, *, state: bool = True, constants: bool = True) -> Path:
    """`h_out = h + x * gain`, `total = h_out`: a window's output is the gain times the sum of every window
    of its stream so far, so carried state (and the constant) show in every number."""
    from edge.package import Manifest, describe_file, utc_now, write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "gain"], ["scaled"]),
            helper.make_node("Add", ["h", "scaled"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["total"]),
        ],
        "accumulator",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, out_dir / "model.onnx")
    manifest = Manifest.model_validate(
        {
            "name": "accumulator",
            "version": "1.0.0",
            "created": utc_now(),
            "task": "raw",
            "artifacts": [{**describe_file(out_dir, "model.onnx"), "format": "onnx", "precision": "fp32"}],
            "inputs": [
                {"name": "x", "shape": [1, 4], "layout": "NC"},
                {"name": "h", "shape": [1, 4]},
                {"name": "gain", "shape": [1]},
            ],
            "outputs": [{"name": "total", "shape": [1, 4]}, {"name": "h_out", "shape": [1, 4]}],
            "postprocess": {},
            "constants": [{"name": "gain", "value": 2.0}] if constants else [],
            "state": [{"input": "h", "output": "h_out"}] if state else [],
        }
    )
    write_manifest(out_dir, manifest)
    return out_dir


def _total(result: dict[str, object]) -> list[float]:
    outputs = result["outputs"]
    assert isinstance(outputs, list)
    return list(np.asarray(outputs[0]["data"]).ravel())


def test_state_is_carried_per_stream_and_constants_are_fed(tmp_path: Path) -> None:
    package = accumulator_package(tmp_path / "pkg")
    window = np.ones((4, 1), np.float32)
    with open_model(package, profile=PROFILE) as model:
        assert [spec.name for spec in model.session.package.manifest.data_inputs] == ["x"]
        # warm-up ran the model at load time, but left no state behind
        assert _total(model.infer(window)) == [2.0] * 4
        assert _total(model.infer(window)) == [4.0] * 4
        session = model.session
        # another stream starts at zeros and does not disturb the first
        assert _total(session.infer(window * 3, stream="other")[0]) == [6.0] * 4
        assert _total(session.infer(window, stream="")[0]) == [6.0] * 4
        session.reset_state("other")
        assert _total(session.infer(window, stream="other")[0]) == [2.0] * 4
        assert _total(session.infer(window)[0]) == [8.0] * 4
        model.reset_state()
        assert _total(model.infer(window)) == [2.0] * 4
        # named tensors: constants and state are filled in when not given, and can be given
        assert _total(model.infer({"x": np.ones((1, 4), np.float32)})) == [4.0] * 4
        given = {"x": np.ones((1, 4), np.float32), "h": np.full((1, 4), 10, np.float32)}
        assert _total(model.infer(given)) == [12.0] * 4


def test_a_model_swap_starts_with_no_state(tmp_path: Path) -> None:
    package = accumulator_package(tmp_path / "pkg")
    window = np.ones((4, 1), np.float32)
    with open_model(package, profile=PROFILE) as model:
        model.infer(window)
        assert _total(model.infer(window)) == [4.0] * 4
    with open_model(package, profile=PROFILE) as reloaded:  # what the daemon's reload builds
        assert _total(reloaded.infer(window)) == [2.0] * 4


@pytest.mark.parametrize(
    ("key", "field", "bad", "message"),
    [
        ("constants", "name", "gian", "constants: 'gian' is not an input"),
        ("state", "input", "hh", "state: 'hh' is not an input"),
        ("state", "output", "total2", "state: 'total2' is not an output"),
    ],
)
def test_manifest_refuses_constants_and_state_that_name_no_tensor(
    tmp_path: Path, key: str, field: str, bad: str, message: str
) -> None:
    package = accumulator_package(tmp_path / "pkg")
    manifest_path = package / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data[key][0][field] = bad
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(PackageError, match=message):
        load_package(package)


def test_the_daemon_carries_state_per_source_and_resets_it_when_the_source_restarts(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A looping file: each pass is a new stream, so the totals climb 2, 4, 6 and start over at 2."""
    from edge.config import DaemonConfig

    package = accumulator_package(tmp_path / "pkg")
    data = tmp_path / "ones.f32"
    data.write_bytes(np.ones(12, "<f4").tobytes())  # three windows of four samples
    config = DaemonConfig.model_validate(
        {
            "device_id": "acc-1",
            "profile": PROFILE,
            "model": str(package),
            "source": {"type": "sensor", "uri": str(data), "format": "f32le", "channels": 1, "window": 4,
                       "loop": True, "realtime": False},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )  # fmt: skip
    with subscribed(mosquitto.port, "edge/acc-1/predictions", client_id="acc-sub") as sub:
        with running_daemon(config):
            assert sub.wait_for(lambda ms: len(ms) >= 9, 30), len(sub.payloads())
        got = {m["source"]["frame"]: _total(m["result"])[0] for m in sub.payloads()}
    assert [got[i] for i in range(9)] == [2.0, 4.0, 6.0] * 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--const", "gian=2"], "--const gian: not an input of the model"),
        (["--const", "gain"], "--const gain: expected NAME=VALUE"),
        (["--const", "gain=two"], "--const gain=two: VALUE 'two' is not a number"),
        (["--state", "h"], "--state h: expected IN:OUT"),
        (["--state", "hh:h_out"], "--state hh:h_out: 'hh' is not an input"),
        (["--state", "h:total2"], "--state h:total2: 'total2' is not an output"),
        (["--const", "h=0", "--state", "h:h_out"], "--state h:h_out: 'h' is already fed"),
        (["--const", "x=1", "--const", "gain=1", "--state", "h:h_out"], "every input is fed"),
    ],
)
def test_const_and_state_options_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from converters.cli import main

    model = accumulator_package(tmp_path / "src") / "model.onnx"
    assert main([str(model), "--out", str(tmp_path / "out"), "--task", "raw", "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_state_output_that_does_not_fit_its_input_is_refused(tmp_path: Path) -> None:
    from converters.stateful import check_fed_inputs, parse_state
    from edge.errors import ConfigError
    from edge.package import TensorSpec

    inputs = [TensorSpec(name="x", shape=[1, 4]), TensorSpec(name="h", shape=[1, 1, 128])]
    outputs = [TensorSpec(name="h_out", shape=[1, 64])]
    with pytest.raises(ConfigError, match=r"--state h:h_out: output \[1, 64\] float32 does not fit input"):
        check_fed_inputs(inputs, outputs, [], [parse_state("h:h_out")])
    symbolic = [TensorSpec(name="h_out", shape=[1, "n", 128])]  # akiki's h_out has a symbolic middle dim
    assert [s.name for s in check_fed_inputs(inputs, symbolic, [], [parse_state("h:h_out")])] == ["x"]


def test_bench_feeds_constants_their_value_and_state_zeros(tmp_path: Path) -> None:
    from edge.backends import load_model
    from edge.bench import bench_feeds
    from edge.profiles import resolve_profile

    package = load_package(accumulator_package(tmp_path / "pkg"))  # no golden: feeds from the specs
    model = load_model(package, resolve_profile(PROFILE).profile)
    try:
        feeds = bench_feeds(model)
        assert feeds["gain"].tolist() == [2.0] and not feeds["h"].any() and feeds["x"].any()
        model.run(feeds)
    finally:
        model.close()


def test_convert_records_constants_and_state_and_calibrates_with_them(tmp_path: Path) -> None:
    """`.npz` samples hold only `x`; the converter feeds `gain` and carries `h` through them in order,
    so the golden data it records is the accumulated stream, and the package serves it."""
    from converters.cli import main

    model = accumulator_package(tmp_path / "src") / "model.onnx"
    np.savez(tmp_path / "calib.npz", x=np.ones((8, 4), np.float32))
    text = (Path(__file__).resolve().parent.parent / "device_profiles" / f"{PROFILE}.yaml").read_text()
    profile = tmp_path / f"{PROFILE}-fp32.yaml"
    profile.write_text(
        text.replace("precision: int8", "precision: fp32").replace(
            f"name: {PROFILE}", f"name: {PROFILE}-fp32"
        )
    )
    out = tmp_path / "pkg"
    code = main([str(model), "--out", str(out), "--task", "raw", "--profile", str(profile), "-q",
                 "--calib", str(tmp_path / "calib.npz"), "--const", "gain=3", "--state", "h:h_out"])  # fmt: skip
    assert code == 0
    manifest = load_package(out).manifest
    assert [(c.name, c.value) for c in manifest.constants] == [("gain", 3.0)]
    assert [(s.input, s.output) for s in manifest.state] == [("h", "h_out")]
    with np.load(out / "golden" / "inputs.npz") as golden:
        carried = golden["h"][:, 0]
        assert golden["gain"].ravel().tolist() == [3.0] * len(carried)
    # each golden sample's state is what the samples before it accumulated (3 per window), not zeros
    assert carried.any() and all(value % 3 == 0 for value in carried)
    with open_model(out, profile=PROFILE) as served:
        assert _total(served.infer(np.ones((4, 1), np.float32))) == [3.0] * 4
