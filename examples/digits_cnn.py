"""A small CNN trained here on sklearn's handwritten digits: a model with a real labelled test set.

`build()` is an `edge-convert` factory (`examples/digits_cnn.py:build`): it trains in a few seconds on
2 cores the first time and caches the weights in $EDGE_CACHE as safetensors, keyed by a hash of this
file, so changing the training code retrains. The 8x8 digits are upsampled to 1x16x16 (values 0..1) to
leave the convolutions room to be pruned. The held-out split (25 %, stratified, fixed seed) is never
used for training. `write_held_out_npz` writes it as an `.npz` keyed by the input name plus a `labels` key
(the true digits, so the gate measures real accuracy); `write_calib_npz` draws calibration inputs from the
training split. From a shell:

    python examples/digits_cnn.py --write-data data     # data/calib.npz, data/test.npz, data/labels.txt
    edge-convert examples/digits_cnn.py:build --out digits.pkg --input-shape 1,1,16,16 \
        --calib data/calib.npz --eval data/test.npz --labels data/labels.txt
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

INPUT_NAME = "input"
INPUT_SHAPE = (1, 1, 16, 16)
CLASSES = [str(digit) for digit in range(10)]
TEST_FRACTION = 0.25
SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 12


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))
    path = root / "digits_cnn"
    path.mkdir(parents=True, exist_ok=True)
    return path


def training_code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x as float32 (N, 1, 16, 16) in 0..1, y as int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = to_model_input(digits.images)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    return x_train, y_train, x_test, y_test


def to_model_input(images_8x8: np.ndarray) -> np.ndarray:
    """sklearn digits (N, 8, 8) with values 0..16 -> (N, 1, 16, 16) float32 in 0..1 (nearest 2x upsample)."""
    scaled = np.asarray(images_8x8, dtype=np.float32) / 16.0
    return np.repeat(np.repeat(scaled, 2, axis=1), 2, axis=2)[:, None, :, :].copy()


def held_out_set() -> tuple[np.ndarray, np.ndarray]:
    _, _, x_test, y_test = load_split()
    return x_test, y_test


def write_held_out_npz(path: Path | str) -> Path:
    """The held-out inputs as `.npz` (key = the model's input name) with their true digits under
    `labels` (edge-convert's gate then scores real top-1 accuracy, not agreement with fp32)."""
    x_test, y_test = held_out_set()
    path = Path(path)
    arrays: dict[str, Any] = {INPUT_NAME: x_test, "labels": y_test}
    np.savez(path, **arrays)
    return path


def write_calib_npz(path: Path | str, samples: int = 128) -> Path:
    """Calibration inputs drawn from the training split only (never the test set)."""
    x_train, _, _, _ = load_split()
    picked = np.random.default_rng(SPLIT_SEED).choice(
        len(x_train), size=min(samples, len(x_train)), replace=False
    )
    path = Path(path)
    arrays: dict[str, Any] = {INPUT_NAME: x_train[np.sort(picked)]}
    np.savez(path, **arrays)
    return path


def held_out_labels() -> np.ndarray:
    return held_out_set()[1]


def write_labels(path: Path | str) -> Path:
    path = Path(path)
    path.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return path


def make_model() -> torch.nn.Module:
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, len(CLASSES)),
    )


def train(epochs: int = EPOCHS, seed: int = TRAIN_SEED) -> torch.nn.Module:
    import torch
    import torch.nn.functional as F

    x_train, y_train, _, _ = load_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
        inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        batches_per_epoch = (len(inputs) + 63) // 64
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=epochs * batches_per_epoch
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(inputs))
            for start in range(0, len(inputs), 64):
                index = order[start : start + 64]
                batch = inputs[index]
                # one-pixel shifts: digits are written anywhere in the box
                dy, dx = torch.randint(-1, 2, (2,)).tolist()
                batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(batch), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return model.eval()


def build() -> torch.nn.Module:
    """The trained digits CNN in eval mode (trained once, then loaded from the safetensors cache)."""
    from safetensors.torch import load_file, save_file

    weights = cache_dir() / f"digits_cnn-{training_code_hash()}.safetensors"
    model = make_model()
    if weights.exists():
        model.load_state_dict(load_file(str(weights)))
        return model.eval()
    model = train()
    partial = weights.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    os.replace(partial, weights)  # concurrent builders never see half a file
    return model.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a torch module on (N, 1, 16, 16) inputs."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(1).numpy() == y).mean())


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="train (or load) the digits CNN and report its accuracy")
    parser.add_argument(
        "--write-data",
        metavar="DIR",
        type=Path,
        help="also write DIR/calib.npz, DIR/test.npz and DIR/labels.txt",
    )
    args = parser.parse_args(argv)
    if args.write_data:
        args.write_data.mkdir(parents=True, exist_ok=True)
        write_calib_npz(args.write_data / "calib.npz")
        write_held_out_npz(args.write_data / "test.npz")
        write_labels(args.write_data / "labels.txt")
        print(f"wrote {args.write_data}/calib.npz, test.npz (with labels) and labels.txt")
    started = time.perf_counter()
    trained = build()
    x_held_out, y_held_out = held_out_set()
    print(
        f"digits CNN: held-out accuracy {accuracy(trained, x_held_out, y_held_out):.4f} on {len(y_held_out)} "
        f"samples ({time.perf_counter() - started:.1f} s)"
    )


if __name__ == "__main__":
    main()
