"""The digits CNN trained here: cached factory, real held-out test set, and pruning+distillation on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from examples import digits_cnn  # noqa: E402


@pytest.fixture(scope="module")
def teacher(cache_dir: Path) -> torch.nn.Module:
    torch.set_num_threads(2)
    return digits_cnn.build()


def test_build_trains_once_then_loads_the_cached_safetensors(
    teacher: torch.nn.Module, cache_dir: Path
) -> None:
    weights = cache_dir / "digits_cnn" / f"digits_cnn-{digits_cnn.training_code_hash()}.safetensors"
    assert weights.is_file() and weights.read_bytes()[:8] != b"PK\x03\x04", "safetensors, not a pickle zip"
    again = digits_cnn.build()
    assert not again.training and not teacher.training
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_trained_model_is_accurate_on_the_real_held_out_digits(teacher: torch.nn.Module) -> None:
    x_test, y_test = digits_cnn.held_out_set()
    assert x_test.shape == (450, *digits_cnn.INPUT_SHAPE[1:]) and x_test.dtype == np.float32
    assert x_test.min() >= 0.0 and x_test.max() <= 1.0
    assert sorted(set(y_test.tolist())) == list(range(10))
    assert digits_cnn.accuracy(teacher, x_test, y_test) >= 0.96


def test_npz_files_are_keyed_by_input_name_and_calibration_never_sees_the_test_set(tmp_path: Path) -> None:
    held_out = digits_cnn.write_held_out_npz(tmp_path / "test.npz")
    calib = digits_cnn.write_calib_npz(tmp_path / "calib.npz", samples=64)
    labels = digits_cnn.write_labels(tmp_path / "labels.txt")
    with np.load(held_out) as test_arrays, np.load(calib) as calib_arrays:
        assert list(test_arrays) == [digits_cnn.INPUT_NAME, "labels"]
        assert list(calib_arrays) == [digits_cnn.INPUT_NAME]
        assert test_arrays["labels"].tolist() == digits_cnn.held_out_labels().tolist()
        test_x, calib_x = test_arrays[digits_cnn.INPUT_NAME], calib_arrays[digits_cnn.INPUT_NAME]
    assert len(test_x) == len(digits_cnn.held_out_labels()) == 450 and calib_x.shape == (64, 1, 16, 16)
    x_train, _, _, _ = digits_cnn.load_split()
    train_rows = {row.tobytes() for row in x_train}
    assert all(row.tobytes() in train_rows for row in calib_x)
    assert labels.read_text().split() == [str(d) for d in range(10)]


def test_pruned_and_distilled_model_stays_close_to_the_teacher_on_held_out_data(
    teacher: torch.nn.Module, tmp_path: Path
) -> None:
    from converters.distill import distill
    from converters.prune import prune_model

    x_train, _, x_test, y_test = digits_cnn.load_split()
    calib = x_train[np.random.default_rng(0).choice(len(x_train), size=256, replace=False)]  # labels unused
    pruned = prune_model(teacher, torch.from_numpy(x_test[:1]), 0.3, "structured")
    assert pruned.macs_after < 0.6 * pruned.macs_before
    student = distill(pruned.model, teacher, [calib], steps=200, batch_size=32).model

    teacher_accuracy = digits_cnn.accuracy(teacher, x_test, y_test)
    # through ONNX Runtime, as it will run on the device
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(
        student, (torch.from_numpy(x_test[:1]),), str(path), dynamo=False, opset_version=17,
        input_names=[digits_cnn.INPUT_NAME], output_names=["logits"],
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {digits_cnn.INPUT_NAME: x[None]})[0] for x in x_test])
    student_accuracy = float((logits.argmax(1) == y_test).mean())
    assert student_accuracy >= teacher_accuracy - 0.025, (student_accuracy, teacher_accuracy)
