"""`edge-convert` end to end on tiny ONNX graphs: a package the runtime accepts, and one-line errors that
leave nothing behind."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from converters.cli import main
from edge.package import load_package
from edge.session import open_model
from edge.signing import generate_keypair, load_public_key
from tests.assets_models import (
    outlier_model,
    photo_crops,
    tiny_classifier,
    unmerged_dims_model,
    write_photo_folder,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), 24, size=64)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("edge-convert: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if name in p.name]


def test_onnx_to_signed_package(tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_classifier(tmp_path / "tiny.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class-{i}" for i in range(10)) + "\n")
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    out = tmp_path / "pkg"
    code = main(
        [str(source), "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,32", "--labels",
         str(labels), "--sign-key", str(tmp_path / "key.pem"), "--sequence", "42", "--report", "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    package = load_package(out, trusted_keys=[load_public_key(tmp_path / "key.pub")])
    manifest = package.manifest
    assert package.signed
    assert manifest.sequence == 42  # the anti-rollback counter is inside the signed bytes
    assert manifest.task == "classification"
    assert [a.path for a in manifest.artifacts] == ["model.int8.onnx", "model.fp32.onnx"]
    int8 = manifest.artifact("onnx", "int8")
    assert int8.quantization is not None and int8.quantization.per_channel
    assert int8.quantization.calibration.samples == 18  # 24 photos, the last quarter held out
    assert int8.quantization.bias_correction
    assert int8.quantization.reduce_range == manifest_profile_reduces_range(manifest.profile)
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert manifest.inputs[0].shape == [1, 3, 32, 32] and manifest.inputs[0].resize == "center-crop"
    assert manifest.outputs[0].name == "logits" and manifest.outputs[0].shape == [1, 10]
    assert package.labels()[3] == "class-3"
    metrics = manifest.metrics
    assert metrics["gate"]["passed"] and metrics["eval_samples"] == 6
    assert (
        metrics["latency_ms"]["int8"]["p50"] > 0
        and metrics["size_bytes"]["int8"] < metrics["size_bytes"]["fp32"]
    )

    # Golden pairs reproduce with the shipped int8 model within the stated tolerance.
    import onnxruntime as ort

    golden_in = np.load(out / "golden" / "inputs.npz")
    golden_out = np.load(out / "golden" / "outputs.npz")
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    for i in range(golden_in["input"].shape[0]):
        (logits,) = session.run(None, {"input": golden_in["input"][i : i + 1]})
        assert np.max(np.abs(logits - golden_out["logits"][i : i + 1])) <= manifest.golden.tolerance["atol"]  # type: ignore[union-attr]

    report = out / "report" / "report.md"
    text = report.read_text()
    assert "Gate: **passed**" in text
    assert f"| {manifest.metrics['recipe']} | yes |" in text  # the recipe search's table
    for image in ("latency_size.png", "stages.png", "agreement.png"):
        assert (out / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = capsys.readouterr().out
    agreement = manifest.metrics["int8"]["agreement_top1"]
    assert "wrote" in summary and f"(top-1 agreement {agreement:.3f}" in summary  # beside the expected drop


def test_gate_excludes_the_sensitive_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = outlier_model(tmp_path / "outlier.onnx")
    images = [
        ((c[:, :, ::-1].astype(np.float32) - 127) / 128).transpose(2, 0, 1) for c in photo_crops(16, 16)
    ]
    np.savez(tmp_path / "calib.npz", input=np.stack(images).astype(np.float32))
    out = tmp_path / "pkg"
    code = main([str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "-q", "--report"])
    assert code == 0, capsys.readouterr().err
    manifest = load_package(out).manifest
    quantization = manifest.artifact("onnx", "int8").quantization
    assert quantization is not None
    assert "mix" in quantization.excluded_nodes and "head" not in quantization.excluded_nodes
    assert manifest.task == "raw" and manifest.metrics["int8"]["cosine_mean"] > 0.99
    assert (out / "report" / "sensitivity.png").is_file()


def test_gate_that_cannot_pass_exits_nonzero_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = outlier_model(tmp_path / "outlier.onnx")
    images = [((c[:, :, ::-1].astype(np.float32) - 127) / 128).transpose(2, 0, 1) for c in photo_crops(8, 16)]
    np.savez(tmp_path / "calib.npz", input=np.stack(images).astype(np.float32))
    metric = tmp_path / "strict.py"
    metric.write_text(
        "import numpy as np\n"
        "def exact(reference, candidate):\n"
        "    return float(np.mean([np.array_equal(r[0], c[0]) for r, c in zip(reference, candidate)]))\n"
    )
    out = tmp_path / "pkg"
    code = main(
        [
            str(source),
            "--out",
            str(out),
            "--calib",
            str(tmp_path / "calib.npz"),
            "--metric",
            f"{metric}:exact",
            "-q",
        ]
    )
    assert code == 1
    line = _error_line(capsys)
    assert "accuracy gate" in line and "user_metric" in line
    assert not out.exists() and not _leftovers(tmp_path, ".pkg.staging")


def _run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*args, "-q"]) == 2
    return _error_line(capsys)


def test_corrupt_and_truncated_onnx(tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tiny_classifier(tmp_path / "tiny.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model" * 50)
    for broken in (truncated, garbage):
        out = tmp_path / f"out-{broken.stem}"
        line = _run_error([str(broken), "--out", str(out), "--calib", str(photos)], capsys)
        assert str(broken) in line
        assert not out.exists()


def test_input_errors_name_their_cause(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tiny_classifier(tmp_path / "tiny.onnx"))
    out = tmp_path / "pkg"

    assert "does not match input 'input'" in _run_error(
        [source, "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,48"], capsys
    )
    assert "has 3 dims" in _run_error(
        [source, "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32"], capsys
    )
    assert "unknown device profile 'toaster'" in _run_error(
        [
            source,
            "--out",
            str(out),
            "--calib",
            str(photos),
            "--input-shape",
            "1,3,32,32",
            "--profile",
            "toaster",
        ],
        capsys,
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in _run_error(
        [source, "--out", str(out), "--calib", str(empty), "--input-shape", "1,3,32,32"], capsys
    )
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(b"not a jpeg")
    (unreadable / "b.png").write_bytes(b"")
    assert "could be decoded" in _run_error(
        [source, "--out", str(out), "--calib", str(unreadable), "--input-shape", "1,3,32,32"], capsys
    )

    np.savez(tmp_path / "wrong_dtype.npz", input=np.zeros((4, 3, 32, 32), np.float64))
    assert "dtype float64" in _run_error(
        [
            source,
            "--out",
            str(out),
            "--calib",
            str(tmp_path / "wrong_dtype.npz"),
            "--input-shape",
            "1,3,32,32",
        ],
        capsys,
    )
    np.savez(tmp_path / "wrong_shape.npz", input=np.zeros((4, 3, 16, 16), np.float32))
    assert "shape [3, 16, 16]" in _run_error(
        [
            source,
            "--out",
            str(out),
            "--calib",
            str(tmp_path / "wrong_shape.npz"),
            "--input-shape",
            "1,3,32,32",
        ],
        capsys,
    )
    np.savez(tmp_path / "wrong_key.npz", image=np.zeros((4, 3, 32, 32), np.float32))
    assert "missing ['input']" in _run_error(
        [source, "--out", str(out), "--calib", str(tmp_path / "wrong_key.npz"), "--input-shape", "1,3,32,32"],
        capsys,
    )
    assert not out.exists() and not _leftovers(tmp_path, ".pkg.staging")


def test_failed_run_keeps_the_previous_package(
    tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tiny_classifier(tmp_path / "tiny.onnx"))
    out = tmp_path / "pkg"
    assert main([source, "--out", str(out), "--calib", str(photos), "--input-shape", "1,3,32,32", "-q"]) == 0
    before = (out / "manifest.json").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    _run_error([source, "--out", str(out), "--calib", str(empty), "--input-shape", "1,3,32,32"], capsys)
    assert (out / "manifest.json").read_bytes() == before
    load_package(out)


def manifest_profile_reduces_range(profile_name: str | None) -> bool:
    from edge.profiles import resolve_profile

    return resolve_profile(profile_name).profile.quantization.reduce_range


def _tiny_npz(tmp_path: Path) -> Path:
    """16 ready input tensors for `tiny_classifier`: the quickest conversion there is."""
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, input=rng.normal(0, 1, (16, 3, 32, 32)).astype(np.float32))
    return path


def test_out_refuses_a_directory_that_is_not_a_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, calib = str(tiny_classifier(tmp_path / "tiny.onnx")), str(_tiny_npz(tmp_path))
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("a user's notes\n")
    line = _run_error([source, "--out", str(out), "--calib", calib], capsys)
    assert f"--out {out}:" in line and "manifest.json" in line and "--force" in line
    assert (out / "notes.txt").read_text() == "a user's notes\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "tiny.onnx", "work"]

    (tmp_path / "file").write_text("x")
    line = _run_error([source, "--out", str(tmp_path / "file"), "--calib", calib], capsys)
    assert f"--out {tmp_path / 'file'}:" in line and "not a directory" in line
    assert (tmp_path / "file").read_text() == "x"

    assert main([source, "--out", str(out), "--calib", calib, "--force", "-q"]) == 0
    assert not (out / "notes.txt").exists() and load_package(out).manifest.task == "classification"


def test_out_replaces_a_package_or_an_empty_directory_by_rename(tmp_path: Path) -> None:
    source, calib = str(tiny_classifier(tmp_path / "tiny.onnx")), str(_tiny_npz(tmp_path))
    out = tmp_path / "pkg"
    out.mkdir()  # an empty directory holds nothing to lose
    assert main([source, "--out", str(out), "--calib", calib, "--sequence", "1", "-q"]) == 0
    first_inode = out.stat().st_ino
    assert main([source, "--out", str(out), "--calib", calib, "--sequence", "2", "-q"]) == 0
    assert load_package(out).manifest.sequence == 2
    assert out.stat().st_ino != first_inode  # a new directory renamed in, not the old one emptied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "pkg", "tiny.onnx"]


def test_conversion_leaves_nothing_in_the_directory_it_runs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxruntime.quantization import quant_pre_process

    source = unmerged_dims_model(tmp_path / "two.onnx")
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(
        calib,
        a=rng.normal(0, 1, (16, 32)).astype(np.float32),
        b=rng.normal(0, 1, (16, 32)).astype(np.float32),
    )

    # The asset still provokes the cause: ORT's pre-processing, called plainly, writes into the cwd.
    provoked = tmp_path / "provoked"
    provoked.mkdir()
    monkeypatch.chdir(provoked)
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        quant_pre_process(str(source), str(tmp_path / "prep.onnx"))
    assert "sym_shape_infer_temp.onnx" in {p.name for p in provoked.iterdir()}

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = main([str(source), "--out", str(tmp_path / "pkg"), "--calib", str(calib), "--task", "raw", "-q"])
    assert code == 0, capsys.readouterr().err
    assert list(cwd.iterdir()) == []
    assert load_package(tmp_path / "pkg").manifest.task == "raw"


def test_a_one_channel_model_from_npz_is_served_by_the_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_classifier(tmp_path / "gray.onnx", channels=1)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.normal(0, 1, (16, 1, 32, 32)).astype(np.float32))
    out = tmp_path / "pkg"
    code = main([str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "-q"])
    assert code == 0, capsys.readouterr().err
    spec = load_package(out).manifest.inputs[0]
    assert (spec.mean, spec.std, spec.color, spec.layout) == ([127.0], [128.0], "GRAY", "NCHW")
    with open_model(out, profile="x86-64-avx2") as model:  # what `edge-infer run` opens
        assert model.session.golden is not None and model.session.golden.passed
        gray = model.infer(rng.integers(0, 255, (48, 40), dtype=np.uint8))
        color = model.infer(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    assert gray["type"] == color["type"] == "classification"


def test_a_four_dim_tensor_that_is_no_image_is_served_as_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_classifier(tmp_path / "five.onnx", channels=5, size=8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.normal(0, 1, (16, 5, 8, 8)).astype(np.float32))
    out = tmp_path / "pkg"
    code = main([str(source), "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "-q"])
    assert code == 0, capsys.readouterr().err
    spec = load_package(out).manifest.inputs[0]
    assert spec.mean is None and spec.color is None and spec.layout == "any"
    with open_model(out) as model:
        result = model.infer({"input": rng.normal(0, 1, (1, 5, 8, 8)).astype(np.float32)})
    assert result["type"] == "classification"


def test_normalization_that_does_not_fit_the_channels_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tiny_classifier(tmp_path / "gray.onnx", channels=1))
    np.savez(tmp_path / "calib.npz", input=np.zeros((8, 1, 32, 32), np.float32))
    out = tmp_path / "pkg"
    line = _run_error(
        [source, "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "--mean", "1,2,3"], capsys
    )
    assert "--mean 1.0,2.0,3.0" in line and "1 channel" in line
    assert not out.exists()


def test_a_package_the_runtime_would_refuse_is_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # NCHW makes the runtime treat the 5-channel input as an image, which its pre-processing refuses:
    # the converter's last step opens the staged package the way edge-infer does, and finds out.
    source = str(tiny_classifier(tmp_path / "five.onnx", channels=5, size=8))
    np.savez(tmp_path / "calib.npz", input=np.zeros((8, 5, 8, 8), np.float32))
    out = tmp_path / "pkg"
    line = _run_error(
        [source, "--out", str(out), "--calib", str(tmp_path / "calib.npz"), "--layout", "NCHW"], capsys
    )
    assert f"--out {out}: not written: the runtime would refuse this package" in line
    assert "1 or 3 channels" in line
    assert not out.exists() and not _leftovers(tmp_path, ".pkg.staging")
