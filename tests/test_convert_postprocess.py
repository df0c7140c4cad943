"""`edge-convert --postprocess`: the manifest's typed post-processing from the command line (inline JSON
or @file), validated by the runtime's own union with one-line field-named errors; and for every head
format, a real ONNX detector decoded by that config scores 100 against itself in the detection gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.accuracy import detections, evaluate, run_onnx
from converters.cli import main
from converters.postprocess import parse_postprocess
from edge.errors import ConfigError
from edge.package import load_package
from edge.tasks.base import DecoderContext
from tests.assets_models import photo_crops

SIZE = 32


def multi_output_model(path: Path, outputs: dict[str, np.ndarray], seed: int = 0) -> Path:
    """A real ONNX model on a [1, 3, 32, 32] image: one full-image Conv whose bias holds every output's
    values and whose small weights move them a little with the image; sliced and reshaped per output."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    flat = np.concatenate([v.reshape(-1) for v in outputs.values()]).astype(np.float32)
    weights = rng.normal(0, 1, (flat.size, 3, SIZE, SIZE)).astype(np.float32) * 2e-4
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="conv"),
        helper.make_node("Flatten", ["conv"], ["flat"], name="flatten"),
    ]
    inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(flat, "b")]
    graph_outputs = []
    start = 0
    for name, value in outputs.items():
        end = start + value.size
        for suffix, array in (
            ("start", [start]),
            ("end", [end]),
            ("axis", [1]),
            ("shape", list(value.shape)),
        ):
            inits.append(numpy_helper.from_array(np.array(array, np.int64), f"{name}_{suffix}"))
        nodes.append(
            helper.make_node("Slice", ["flat", f"{name}_start", f"{name}_end", f"{name}_axis"], [f"{name}_s"])
        )
        nodes.append(helper.make_node("Reshape", [f"{name}_s", f"{name}_shape"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
        start = end
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        graph_outputs,
        inits,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# YOLO [1, N, 4+C]: cx, cy, w, h in input pixels and two class scores.
YOLO = np.array(
    [[8, 8, 10, 10, 0.9, 0.05], [24, 10, 8, 12, 0.05, 0.8], [16, 24, 12, 8, 0.7, 0.1]]
    + [[4 * i, 28, 4, 4, 0.02, 0.03] for i in range(1, 6)],
    np.float32,
)[None]


def _yolox() -> np.ndarray:
    """Raw grid rows of strides 8, 16, 32 on 32x32 (16 + 4 + 1 cells): tx, ty, log w, log h, obj, class."""
    head = np.zeros((1, 21, 6), np.float32)
    head[0, :, 4:] = 0.01
    head[0, 5] = [0.5, 0.5, np.log(1.5), np.log(1.2), 0.9, 0.95]  # stride 8, row 1 column 1
    head[0, 16 + 3] = [0.2, 0.6, np.log(0.8), np.log(1.0), 0.8, 0.9]  # stride 16, row 1 column 1
    return head


def _ssd() -> dict[str, np.ndarray]:
    """Anchors of strides 8 and 16, two per cell (32 + 8 = 40): regressors [1, 40, 4], scores [1, 40, 2]."""
    reg = np.zeros((1, 40, 4), np.float32)
    reg[0, :, 2:] = 3.2  # w, h of 0.1 with box_scale 32
    scores = np.full((1, 40, 2), 0.01, np.float32)
    reg[0, 10] = [1.0, -0.5, 6.4, 8.0]
    scores[0, 10] = [0.9, 0.02]
    reg[0, 35] = [-2.0, 1.0, 9.6, 6.4]
    scores[0, 35] = [0.03, 0.8]
    return {"regressors": reg, "scores": scores}


def _boxes() -> dict[str, np.ndarray]:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 1.0, 0.9], [0.0, 0.0, 0.05, 0.05]]], np.float32)
    scores = np.array([[[0.9, 0.0, 0.0], [0.0, 0.0, 0.8], [0.1, 0.0, 0.0]]], np.float32)
    return {"boxes": boxes, "scores": scores}


FORMATS = {
    "yolo": ({"head": YOLO}, {"type": "detection", "format": "yolo", "score_threshold": 0.3}),
    "yolo-attributes-first": (
        {"head": YOLO.transpose(0, 2, 1).copy()},
        {"type": "detection", "format": "yolo", "head_layout": "attributes_first", "score_threshold": 0.3},
    ),
    "yolox": ({"head": _yolox()}, {"type": "detection", "format": "yolox", "strides": [8, 16, 32]}),
    "ssd": (
        _ssd(),
        {
            "type": "detection",
            "format": "ssd",
            "anchors": {"strides": [8, 16], "per_cell": [2, 2]},
            "box_scale": 32.0,
            "score_threshold": 0.3,
        },
    ),
    "boxes": (_boxes(), {"type": "detection", "format": "boxes", "score_threshold": 0.3}),
}


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    crops = photo_crops(count, SIZE)
    return [{"input": ((c[None].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2).copy()} for c in crops]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fp32_scores_100_against_itself_for_every_format(tmp_path: Path, name: str) -> None:
    outputs, post = FORMATS[name]
    model = multi_output_model(tmp_path / f"{name}.onnx", outputs)
    config = parse_postprocess(json.dumps(post))
    labels = ("a", "b", "c")[: 3 if name in ("boxes",) else 2]
    decoder = config.decoder(
        DecoderContext(labels=labels, input_hw=(SIZE, SIZE), output_names=tuple(outputs))
    )
    reference = run_onnx(model, _feeds(4))
    found = [len(detections(decoder(sample, None))[0]) for sample in reference]
    assert min(found) >= 2  # the decoder finds the planted objects in every sample: the score means something
    itself = evaluate("detection", reference, reference, decoder=decoder)
    assert itself.details["map50_vs_fp32"] == 1.0 and itself.drop_points == 0.0


def test_edge_convert_writes_the_given_postprocess_and_gates_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs, post = FORMATS["yolox"]
    source = multi_output_model(tmp_path / "det.onnx", outputs)
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in _feeds(12)]))
    (tmp_path / "post.json").write_text(json.dumps({k: v for k, v in post.items() if k != "type"}))
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "--task", "detection",
         "--postprocess", f"@{tmp_path / 'post.json'}", "--formats", "onnx", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    written = json.loads(manifest.to_json())["postprocess"]
    assert written["format"] == "yolox" and written["strides"] == [8, 16, 32] and manifest.task == "detection"
    assert manifest.metrics["fp32"]["map50_vs_fp32"] == 1.0
    assert manifest.metrics["gate"]["metric"] == "box_map50_vs_fp32" and manifest.metrics["gate"]["passed"]


def test_inline_postprocess_sets_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs, post = FORMATS["yolo"]
    source = multi_output_model(tmp_path / "det.onnx", outputs)
    np.savez(tmp_path / "calib.npz", input=np.concatenate([f["input"] for f in _feeds(8)]))
    code = main(
        [str(source), "--out", str(tmp_path / "pkg"), "--calib", str(tmp_path / "calib.npz"),
         "--postprocess", json.dumps(post), "--formats", "onnx", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(tmp_path / "pkg").manifest
    assert (
        manifest.task == "detection"
        and json.loads(manifest.to_json())["postprocess"]["score_threshold"] == 0.3
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"type": "detection", "format": "yolov9"}',
            "--postprocess: format: 'yolov9' is not one of yolo, yolox",
        ),
        (
            '{"type": "detection", "format": "yolox", "strides": "8"}',
            "--postprocess: strides: Input should be",
        ),
        (
            '{"type": "detection", "format": "ssd", "anchors": {"strides": [8]}}',
            "anchors.per_cell: Field required",
        ),
        ('{"type": "detection", "iou": 0.5}', "--postprocess: iou: Extra inputs are not permitted"),
        ("{oops", "--postprocess: not valid JSON"),
        ('{"type": "raw"}', "type: 'raw' does not match --task detection"),
    ],
)
def test_bad_postprocess_is_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_postprocess(text, "detection")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_file_names_itself_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "head.json"
    bad.write_text('{"type": "detection", "format": "yolox", "strides": [8, "x"]}')
    code = main(["m.onnx", "--out", str(tmp_path / "pkg"), "--postprocess", f"@{bad}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"edge-convert: error: {bad}: strides.1: ") and "\n" not in err
    code = main(["m.onnx", "--out", str(tmp_path / "pkg"), "--postprocess", f"@{tmp_path / 'missing.json'}"])
    assert code == 2 and "missing.json: cannot read" in capsys.readouterr().err
