"""A model with a symbolic width, end to end: a tiny CTC line recognizer built with onnx.helper (gray
`[1, 1, 16, width]` -> `[width, 1, 3]` scores), calibrated on images and on an `.npz` of samples of
different widths; the manifest keeps the width symbolic and the runtime serves lines of two widths."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.calibration import load_npz, resolve_input_specs
from converters.cli import main
from edge import open_model
from edge.errors import ConfigError
from edge.package import TensorSpec, load_package

HEIGHT = 16
CHARSET = ["", "#", " "]  # blank, a dark column, a light column


def line_recognizer(path: Path) -> Path:
    """Per column: blank scores 0.5, '#' how dark the column is, ' ' how light (pixels 0..1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 1, HEIGHT, 1), np.float32)
    weights[1] = -4.0 / HEIGHT
    weights[2] = 4.0 / HEIGHT
    bias = np.array([0.5, 2.0, -2.0], np.float32)  # dark column: '#' 2.0; light: ' ' 2.0; grey: blank
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["columns"], name="columns"),  # [1, 3, 1, W]
        helper.make_node("Squeeze", ["columns", "axis2"], ["scores"], name="squeeze"),  # [1, 3, W]
        helper.make_node("Transpose", ["scores"], ["logits"], perm=[2, 0, 1], name="steps"),  # [W, 1, 3]
    ]
    graph = helper.make_graph(
        nodes,
        "line",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, HEIGHT, "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["width", 1, 3])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def stripes(pattern: str, column: int = 6, height: int = HEIGHT * 2) -> np.ndarray:
    """A BGR line: '#' a dark block, '.' a light one, `column` px wide each at height HEIGHT, drawn at
    twice the size (so the runtime has to scale it to height 16 keeping the aspect ratio)."""
    row = np.concatenate([np.full(column * 2, 20 if c == "#" else 235, np.uint8) for c in pattern])
    return np.ascontiguousarray(np.repeat(np.repeat(row[None, :, None], height, 0), 3, 2))


PATTERNS = ["#.#", "##..#", "#.#.#.#", ".#..##.#", "#..#", "##.#.##", ".##.", "#.##..#.#"]


def test_converter_keeps_the_width_symbolic_and_the_runtime_serves_two_widths(tmp_path: Path) -> None:
    model = line_recognizer(tmp_path / "line.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, pattern in enumerate(PATTERNS * 2):
        cv2.imwrite(str(calib / f"{i:02d}.png"), stripes(pattern, column=5 + i % 4))
    (tmp_path / "charset.json").write_text(json.dumps(CHARSET), encoding="utf-8")
    out = tmp_path / "pkg"
    code = main([
        str(model), "--out", str(out), "--calib", str(calib), "--labels", str(tmp_path / "charset.json"),
        "--mean", "0", "--std", "255", "--postprocess", '{"type": "text-recognition"}', "--max-drop", "1", "-q",
    ])  # fmt: skip
    assert code == 0
    manifest = load_package(out).manifest
    assert manifest.inputs[0].shape == [1, 1, HEIGHT, "width"] and manifest.inputs[0].color == "GRAY"
    assert manifest.outputs[0].shape == ["width", 1, 3]  # the model's own name for the varying axis
    metrics = manifest.metrics
    assert metrics["gate"]["metric"] == "char_accuracy_vs_fp32" and metrics["gate"]["passed"]
    assert metrics["fp32"]["char_accuracy_vs_fp32"] == 1.0  # fp32 against itself scores 100
    assert metrics["recipes"][-1]["recipe"] == metrics["recipe"] and metrics["recipes"][-1]["passed"]
    with open_model(out) as served:
        short, long = served.infer(stripes("#.#")), served.infer(stripes("##..##...#", column=9))
    assert short["text"] == "# #" and long["text"] == "# # #"  # repeats merged: one per block


def test_npz_with_one_array_per_sample_of_different_widths(tmp_path: Path) -> None:
    spec = resolve_input_specs(
        [TensorSpec(name="input", shape=["N", 1, HEIGHT, "width"])],
        input_shape=None, layout=None, color=None, mean=[0.0], std=[255.0], resize="stretch",
    )[0]  # fmt: skip
    assert spec.shape == [1, 1, HEIGHT, "width"]
    path = tmp_path / "lines.npz"
    samples = {
        "input[0]": np.zeros((1, 1, HEIGHT, 30), np.float32),
        "input[1]": np.ones((1, HEIGHT, 45), np.float32),
    }
    np.savez(path, **samples)
    loaded = load_npz(path, [spec], "--calib")
    assert [f["input"].shape for f in loaded.feeds] == [(1, 1, HEIGHT, 30), (1, 1, HEIGHT, 45)]
    np.savez(path, **{"input[0]": samples["input[0]"], "input[2]": samples["input[1]"]})
    with pytest.raises(ConfigError, match=r"input\[1\] is missing"):
        load_npz(path, [spec], "--calib")
    np.savez(path, **{"input[0]": np.zeros((1, 1, 8, 30), np.float32)})
    with pytest.raises(ConfigError, match=r"'input\[0\]' has shape \[1, 1, 8, 30\]"):
        load_npz(path, [spec], "--calib")


def test_an_image_with_height_and_width_symbolic_still_needs_input_shape() -> None:
    with pytest.raises(
        ConfigError, match="needs its height or its width fixed: give them with --input-shape"
    ):
        resolve_input_specs(
            [TensorSpec(name="image", shape=["N", 3, "h", "w"])],
            input_shape=None, layout=None, color=None, mean=None, std=None, resize="stretch",
        )  # fmt: skip
