"""torch factory sources: loading, safe weights, export to ONNX checked against torch, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from converters.export import ExportError, check_against_torch, export_onnx
from converters.sources import load_source
from edge.errors import ConfigError, PackageError
from edge.package import Package, load_package
from tests.assets_models import write_photo_folder

PROFILES = Path(__file__).resolve().parents[1] / "device_profiles"

FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


def wide():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU6(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU6(),
        nn.Conv2d(64, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(1, -1)  # a graph that only knows batch 1


def fixed_batch():
    torch.manual_seed(0)
    return _FixedBatch().eval()


def broken():
    raise RuntimeError("weights server unreachable")


def not_a_module():
    return 42
"""


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_net.py"
    path.write_text(FACTORY)
    return path


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(count)]


def test_export_matches_torch(tmp_path: Path, factory: Path) -> None:
    source = load_source(f"{factory}:build")
    assert source.kind == "torch" and not source.module.training
    result = export_onnx(source.module, _feeds(3), ["input"], tmp_path / "model.onnx")
    assert result.exporter == "dynamo" and result.opset >= 18
    assert result.max_abs_diff <= result.tolerance["atol"] + 1e-2
    import onnx

    model = onnx.load(str(result.path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_the_batch_axis_is_exported_symbolic_unless_the_graph_fixes_it(tmp_path: Path, factory: Path) -> None:
    import onnxruntime as ort

    result = export_onnx(load_source(f"{factory}:build").module, _feeds(3), ["input"], tmp_path / "free.onnx")
    assert result.dynamic_batch
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    batch = np.concatenate([f["input"] for f in _feeds(4)])
    together = session.run(None, {"input": batch})[0]
    alone = np.concatenate([session.run(None, f)[0] for f in _feeds(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)

    fixed = export_onnx(
        load_source(f"{factory}:fixed_batch").module, _feeds(2), ["input"], tmp_path / "fixed.onnx"
    )
    assert not fixed.dynamic_batch  # exported with batch 1 rather than failing
    assert ort.InferenceSession(str(fixed.path)).get_inputs()[0].shape[0] == 1


def test_export_check_catches_a_wrong_graph(tmp_path: Path, factory: Path) -> None:
    import torch

    source = load_source(f"{factory}:build")
    result = export_onnx(source.module, _feeds(2), ["input"], tmp_path / "model.onnx")
    with torch.no_grad():
        source.module[-1].bias += 1.0  # the torch model changes; the exported graph no longer matches it
    with pytest.raises(ExportError, match="differs from torch"):
        check_against_torch(source.module, result.path, _feeds(2), ["input"])


def test_weights_are_loaded_safely(tmp_path: Path, factory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    source = load_source(f"{factory}:build")
    state = {k: v + 0.5 for k, v in source.module.state_dict().items() if v.dtype.is_floating_point}
    state.update({k: v for k, v in source.module.state_dict().items() if not v.dtype.is_floating_point})
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for weights in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        loaded = load_source(f"{factory}:build", weights).module
        assert torch.allclose(loaded[0].weight, state["0.weight"])

    from fractions import Fraction

    torch.save({"0.weight": Fraction(1, 3)}, tmp_path / "evil.pt")  # any non-tensor class: not unpickled
    with pytest.raises(PackageError, match="cannot read weights safely"):
        load_source(f"{factory}:build", tmp_path / "evil.pt")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(PackageError, match="does not fit the model"):
        load_source(f"{factory}:build", tmp_path / "wrong.pt")


def test_factory_errors(factory: Path) -> None:
    with pytest.raises(ConfigError, match="raised RuntimeError: weights server unreachable"):
        load_source(f"{factory}:broken")
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        load_source(f"{factory}:not_a_module")
    with pytest.raises(ConfigError, match="has no callable 'missing'"):
        load_source(f"{factory}:missing")
    with pytest.raises(ConfigError, match="not found"):
        load_source("no/such/file.py:build")


def test_factory_to_package(tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = write_photo_folder(tmp_path / "photos", 16, size=48)
    out = tmp_path / "pkg"
    code = main(
        [f"{factory}:build", "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,32",
         "--formats", "onnx", "--task", "classification", "--max-drop", "100", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    assert manifest.name == "tiny-net"
    assert manifest.outputs[0].shape == ["N", 5] and manifest.inputs[0].shape == ["N", 3, 32, 32]
    assert manifest.inputs[0].layout == "NCHW" and manifest.inputs[0].resize == "center-crop"
    assert manifest.pruning is None
    export = manifest.metrics["export"]
    assert export["exporter"] == "dynamo" and export["opset"] >= 18
    assert export["max_abs_diff_vs_torch"] <= export["tolerance"]["atol"] + export["tolerance"]["rtol"] * 100


def test_input_shape_the_model_rejects(
    tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = write_photo_folder(tmp_path / "photos", 4, size=48)
    out = tmp_path / "pkg"
    code = main(
        [f"{factory}:build", "--out", str(out), "--calib", str(photos), "--input-shape", "1,4,32,32", "-q"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-convert: error: --input-shape 1,4,32,32: the model rejects this input")
    assert err.count("\n") == 0 and not out.exists()


def test_raising_factory_is_one_line(
    tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"
    assert main([f"{factory}:broken", "--out", str(out), "--calib", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("edge-convert: error: factory") and "weights server" in err
    assert not out.exists()


def _convert_on_photos(
    tmp_path: Path, source: str, *options: str, capsys: pytest.CaptureFixture[str]
) -> Package:
    """`edge-convert SOURCE` on 12 generated photos at 32x32; asserts success and loads the package."""
    photos = write_photo_folder(tmp_path / "photos", 12, size=48)
    out = tmp_path / "pkg"
    code = main(
        [source, "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,32", *options, "-q"]
    )
    assert code == 0, capsys.readouterr().err
    return load_package(out)


def test_prune_and_distill_stages(tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = _convert_on_photos(
        tmp_path, f"{factory}:wide", "--formats", "onnx", "--prune", "0.5", "--distill-steps", "5",
        "--distill-lr", "3e-4", "--max-drop", "100", capsys=capsys,
    )  # fmt: skip
    pruning = package.manifest.pruning
    assert pruning is not None and pruning["mode"] == "structured" and pruning["ratio"] == 0.5
    assert pruning["params_after"] < pruning["params_before"]
    assert pruning["distillation"]["steps"] == 5 and pruning["distillation"]["loss_last"] is not None
    assert pruning["distillation"]["lr"] == 3e-4
    held_out = pruning["distillation"]["held_out_loss"]
    assert "0" in held_out and str(pruning["distillation"]["best_step"]) in held_out  # the kept checkpoint
    metrics = package.manifest.metrics
    assert metrics["size_bytes"]["pruned_fp32"] < metrics["size_bytes"]["fp32"]
    assert set(metrics["latency_ms"]) == {"fp32", "pruned_fp32", "int8"}


def test_unstructured_prune_then_distill_keeps_its_zeros(
    tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = _convert_on_photos(
        tmp_path, f"{factory}:wide", "--prune-mode", "unstructured", "--prune", "0.5", "--distill-steps", "5",
        "--max-drop", "100", capsys=capsys,
    )  # fmt: skip
    pruning = package.manifest.pruning
    assert pruning is not None and pruning["mode"] == "unstructured"
    assert pruning["sparsity_after_distillation"] == pytest.approx(pruning["sparsity"], abs=1e-3)
    assert pruning["sparsity"] > 0.45


@pytest.mark.parametrize("multiple", [8, 16])
def test_pruned_channel_counts_follow_the_device_profile(
    tmp_path: Path, factory: Path, multiple: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The profile's `pruning.channel_multiple` reaches the pruner: 64 channels asked to lose 40 % keep
    40 (multiple of 8) or 48 (multiple of 16, what x86 int8 depthwise kernels want)."""
    import onnx
    import yaml

    profile = yaml.safe_load((PROFILES / "x86-64-generic.yaml").read_text())
    profile["pruning"] = {"channel_multiple": multiple}
    profile["name"] = "wide-vectors"
    profile_path = tmp_path / "wide-vectors.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    package = _convert_on_photos(
        tmp_path,
        f"{factory}:wide",
        "--profile",
        str(profile_path),
        "--prune",
        "0.4",
        "--distill-time",
        "0",
        "--max-drop",
        "100",
        capsys=capsys,
    )
    assert package.manifest.pruning is not None and package.manifest.pruning["channel_multiple"] == multiple
    graph = onnx.load(str(package.path("model.fp32.onnx"))).graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    conv_out = [weights[node.input[1]][0] for node in graph.node if node.op_type == "Conv"]
    assert conv_out[:2] == [{8: 40, 16: 48}[multiple]] * 2  # the depthwise conv follows its input
    assert all(channels % multiple == 0 for channels in conv_out)


@pytest.mark.slow
def test_tflite_artifact_beside_onnx(
    tmp_path: Path, factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = write_photo_folder(tmp_path / "photos", 12, size=48)
    out = tmp_path / "pkg"
    code = main(
        [f"{factory}:build", "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,32",
         "--formats", "onnx,tflite", "--max-drop", "100", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    tflite = manifest.artifact("tflite", "int8")
    assert tflite.inputs is not None and tflite.inputs[0].layout == "NHWC"
    assert tflite.inputs[0].mean == manifest.inputs[0].mean and tflite.inputs[0].color == "RGB"
    assert manifest.metrics["tflite_int8"]["samples"] == 3
    assert isinstance(manifest.metrics["tflite_int8"]["bias_corrected"], bool)  # which quantization was kept
    # The golden outputs come from the int8 ONNX; their tolerance covers the .tflite too, so it passes.
    from edge.backends import load_model
    from edge.profiles import load_profile

    loaded = load_model(
        load_package(out), load_profile(manifest.profile or "x86-64-generic"), backend="litert"
    )
    assert loaded.backend_name == "litert" and not loaded.fallback
    assert loaded.golden is not None and loaded.golden.passed, loaded.golden

    # The .tflite itself as SOURCE: packaged as it is after a check that it loads and runs.
    shipped = tmp_path / "shipped"
    assert main([str(out / "model.int8.tflite"), "--out", str(shipped), "--calib", str(photos), "-q"]) == 0
    repackaged = load_package(shipped).manifest
    assert [a.format for a in repackaged.artifacts] == ["tflite"] and repackaged.artifacts[
        0
    ].precision == "int8"
    assert repackaged.inputs[0].scale is not None and repackaged.inputs[0].layout == "NHWC"
