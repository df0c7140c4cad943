"""The Python API (`from edge import open_model`) and the session the daemon serves, on real ORT sessions."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge import open_model
from edge.errors import EdgeError, PackageError
from tests.daemon_helpers import TINY_LABELS, make_tiny_package

REPO = Path(__file__).resolve().parent.parent
PROFILE = "x86-64-avx2"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_tiny_package(tmp_path / "pkg")


def _solid_rgb(r: int, g: int, b: int) -> np.ndarray:
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:] = (r, g, b)
    return frame


def test_infer_takes_an_rgb_frame_and_returns_the_payload_result(package: Path) -> None:
    # The tiny model's logits are 4 x the mean R, G, B (0..1) and 1.8 for "gray": a red RGB frame is
    # "red" only if the API really treats its input as RGB (as BGR it would be "blue").
    with open_model(package, profile=PROFILE) as model:
        assert (model.name, model.task, model.backend) == ("tiny-colour", "classification", "onnxruntime")
        result = model.infer(_solid_rgb(255, 0, 0))
        assert result["type"] == "classification"
        top = result["top_k"]
        assert isinstance(top, list) and len(top) == 2
        assert top[0] == {"label": "red", "index": 0, "score": pytest.approx(0.8715, abs=1e-3)}
        assert [
            r["top_k"][0]["label"] for r in model.infer_batch([_solid_rgb(0, 0, 255), _solid_rgb(40, 40, 40)])
        ] == [
            "blue",
            "gray",
        ]


def test_infer_with_named_tensors_skips_preprocessing(package: Path) -> None:
    tensor = np.zeros((1, 3, 32, 32), np.float32)
    tensor[:, 1] = 1.0  # all green, already normalized
    with open_model(package, profile=PROFILE) as model:
        assert model.infer({"input": tensor})["top_k"][0]["label"] == "green"
        with pytest.raises(EdgeError, match="input 'wrong' is not a model input"):
            model.infer({"wrong": tensor})


def test_bad_input_gets_a_one_line_error(package: Path) -> None:
    with open_model(package, profile=PROFILE) as model:
        with pytest.raises(EdgeError, match=r"takes 'input' \[1, 3, 32, 32\] float32, not text"):
            model.infer("a sentence")
        with pytest.raises(EdgeError, match="expected a numpy array or a dict of them, got list"):
            model.infer([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(EdgeError, match="is closed"):
        model.infer(_solid_rgb(255, 0, 0))


def test_a_tar_package_is_unpacked_for_the_model_and_removed_on_close(package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "pkg.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(package, arcname="pkg")
    model = open_model(archive, profile=PROFILE)
    unpacked = model.session.package.root
    assert unpacked.is_dir() and unpacked != package
    assert model.infer(_solid_rgb(0, 255, 0))["top_k"][0]["label"] == "green"
    model.close()
    assert not unpacked.exists()


def test_a_tampered_package_is_refused(tmp_path: Path) -> None:
    broken = make_tiny_package(tmp_path / "broken", corrupt="hash")
    with pytest.raises(PackageError, match="sha256 of 'model.onnx'"):
        open_model(broken, profile=PROFILE)


def test_import_edge_does_not_load_the_session_until_asked() -> None:
    code = "import sys, edge; print('edge.session' in sys.modules); edge.open_model; print('edge.session' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "True"]


def test_the_readme_python_example_runs_as_written(package: Path, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README's Python API section has no python block"
    out = subprocess.run(
        [sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert any(label in out.stdout for label in TINY_LABELS), out.stdout
