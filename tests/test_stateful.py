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
