"""Calibration and evaluation samples: an image folder (through the runtime's own pre-processing) or an .npz.

Images go through `edge.processing.preprocess.ImagePreprocessor` built from the very input spec written
into the manifest, so the model is calibrated on exactly what the device will feed it. An `.npz` holds
ready tensors keyed by input name, samples stacked on the first axis; each sample is fed as a batch of one.
Samples of different shapes (a dimension the model leaves symbolic, such as a text line's width) cannot
be stacked: then the `.npz` holds one array per sample and input, keyed `NAME[0]`, `NAME[1]`, ... (each
with or without its batch axis of one).

A symbolic dimension other than the batch stays symbolic in the manifest: the samples fix it one by one.
An image input may leave its width (or its height) symbolic, not both: the runtime scales a frame to the
fixed side and lets the other follow the frame's aspect ratio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import ConfigError
from edge.package import TensorSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# An .npz key that carries ground-truth class indices instead of a model input.
LABELS_KEY = "labels"
# An .npz key holding one sample of one input: `NAME[i]`.
SAMPLE_KEY = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")


@dataclass
class SampleSet:
    feeds: list[dict[str, np.ndarray]]
    # Ground-truth class index per sample when known (image sub-folders named by label, or an npz `labels`).
    labels: list[int] | None = None
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.feeds)

    def split(self, fraction: float) -> tuple[SampleSet, SampleSet]:
        """(first part, held-out last `fraction`) — with fewer than 4 samples both are the whole set."""
        if len(self) < 4:
            return self, self
        cut = max(1, round(len(self) * (1 - fraction)))

        def part(lo: int, hi: int) -> SampleSet:
            return SampleSet(
                self.feeds[lo:hi],
                self.labels[lo:hi] if self.labels is not None else None,
                self.sources[lo:hi],
            )

        return part(0, cut), part(cut, len(self))


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option} '{text}': expected comma-separated numbers") from exc


def parse_shape(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"--input-shape '{text}': expected comma-separated integers like 1,3,224,224"
        ) from exc
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"--input-shape '{text}': every dimension must be a positive integer")
    return shape


def resolve_input_specs(
    declared: list[TensorSpec],
    *,
    input_shape: list[int] | None,
    layout: str | None,
    color: str | None,
    mean: list[float] | None,
    std: list[float] | None,
    resize: str,
) -> list[TensorSpec]:
    """Fix every input's shape (symbolic dims from `--input-shape`) and attach the pre-processing spec."""
    if not declared:
        if input_shape is None:
            input_shape = [1, 3, 224, 224]
        declared = [TensorSpec(name="input", shape=list(input_shape), dtype="float32")]
    specs: list[TensorSpec] = []
    for index, spec in enumerate(declared):
        shape = list(spec.shape)
        if index == 0 and input_shape is not None:
            if len(input_shape) != len(shape):
                raise ConfigError(
                    f"--input-shape {_fmt(input_shape)} has {len(input_shape)} dims but input "
                    f"'{spec.name}' has {len(shape)} ({_fmt(shape)})"
                )
            for axis, (given, have) in enumerate(zip(input_shape, shape, strict=True)):
                if isinstance(have, int) and have != given:
                    raise ConfigError(
                        f"--input-shape {_fmt(input_shape)} does not match input '{spec.name}' "
                        f"{_fmt(shape)} at axis {axis}"
                    )
            shape = list(input_shape)
        fixed: list[int | str] = [
            d if isinstance(d, int) else 1 if axis == 0 else d for axis, d in enumerate(shape)
        ]
        # An image is a 4-D tensor with 1 (gray) or 3 (colour) channels where its layout puts them: the
        # runtime builds its image pre-processing for it. Any other 4-D tensor is fed as it is ("any").
        four_d = len(fixed) == 4 and spec.dtype in ("float32", "uint8", "int8")
        spec_layout = layout or (_guess_layout(fixed) if four_d else None)
        channels = _channels(fixed, spec_layout) if four_d else None
        is_image = channels in (1, 3)
        if is_image and not any(isinstance(d, int) for d in _height_width(fixed, spec_layout)):
            raise ConfigError(
                f"input '{spec.name}' has dynamic dims {_fmt(shape)}; an image needs its height or its "
                "width fixed: give them with --input-shape"
            )
        if four_d and not is_image and layout is None:
            spec_layout = "any"
        if is_image:
            assert channels is not None
            _check_per_channel(mean, "--mean", spec.name, channels)
            _check_per_channel(std, "--std", spec.name, channels)
        specs.append(
            TensorSpec(
                name=spec.name,
                shape=fixed,
                dtype=spec.dtype,
                layout=spec_layout,
                color=("GRAY" if channels == 1 else color or "RGB") if is_image else None,
                resize=resize if is_image else None,
                mean=(mean if mean is not None else [127.0] * (channels or 0)) if is_image else mean,
                std=(std if std is not None else [128.0] * (channels or 0)) if is_image else std,
                scale=spec.scale,
                zero_point=spec.zero_point,
            )
        )
    return specs


def _channels(shape: list[int | str], layout: str | None) -> int | None:
    axis = {"NCHW": 1, "NHWC": 3}.get(layout or "")
    return None if axis is None or not isinstance(shape[axis], int) else int(shape[axis])


def _height_width(shape: list[int | str], layout: str | None) -> list[int | str]:
    return list(shape[2:4]) if layout == "NCHW" else list(shape[1:3])


def fits(sample_shape: tuple[int, ...], spec: TensorSpec) -> bool:
    """Whether a batch-of-one sample fits the spec: every fixed dimension equal, symbolic ones any size."""
    if len(sample_shape) != len(spec.shape):
        return False
    return all(
        not isinstance(want, int) or have == (1 if axis == 0 else want)
        for axis, (have, want) in enumerate(zip(sample_shape, spec.shape, strict=True))
    )


def _check_per_channel(values: list[float] | None, option: str, name: str, channels: int) -> None:
    """--mean/--std hold one value for all channels or one per channel (the runtime refuses others)."""
    if values is not None and len(values) not in (1, channels):
        given = ",".join(str(v) for v in values)
        raise ConfigError(
            f"{option} {given}: {len(values)} values, but input '{name}' has {channels} channel(s); "
            f"give 1 or {channels}"
        )


def _guess_layout(shape: list[int | str]) -> str:
    return "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"


def _fmt(shape: list[int] | list[int | str]) -> str:
    return ",".join(str(d) for d in shape)


def load_samples(
    path: Path, specs: list[TensorSpec], option: str, labels: list[str] | None = None
) -> SampleSet:
    if not path.exists():
        raise ConfigError(f"{option} {path}: not found")
    if path.is_dir():
        return load_image_folder(path, specs, option, labels)
    if path.suffix == ".npz":
        return load_npz(path, specs, option)
    raise ConfigError(f"{option} {path}: expected a folder of images or an .npz of input tensors")


def load_image_folder(
    folder: Path, specs: list[TensorSpec], option: str, labels: list[str] | None = None
) -> SampleSet:
    import cv2

    from edge.processing.preprocess import ImagePreprocessor

    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise ConfigError(f"{option} {folder}: the model has {len(specs)} inputs ({names}); give an .npz")
    preprocess = ImagePreprocessor.from_spec(specs[0])
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"{option} {folder}: cannot list folder: {exc.strerror}") from exc
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ConfigError(f"{option} {folder}: no image files in folder ({len(files)} other files)")
    index_of = {name: i for i, name in enumerate(labels or [])}
    result = SampleSet(feeds=[], labels=[] if labels else None)
    for image_path in images:
        frame = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if frame is None:
            result.skipped.append(str(image_path))
            continue
        tensor, _ = preprocess(frame)
        result.feeds.append({specs[0].name: tensor})
        result.sources.append(str(image_path.relative_to(folder)))
        if result.labels is not None:
            parent = image_path.parent.name if image_path.parent != folder else ""
            if parent in index_of:
                result.labels.append(index_of[parent])
            elif parent.isdigit():
                result.labels.append(int(parent))
            else:
                result.labels = None  # not a labelled layout: fall back to agreement with fp32
    if not result.feeds:
        raise ConfigError(
            f"{option} {folder}: none of the {len(images)} image files could be decoded (first: {images[0].name})"
        )
    return result


def load_npz(path: Path, specs: list[TensorSpec], option: str) -> SampleSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise ConfigError(f"{option} {path}: not a readable .npz: {str(exc).splitlines()[0]}") from exc
    wanted = {s.name for s in specs}
    per_sample: dict[str, dict[int, np.ndarray]] = {}
    for key in list(arrays):
        match = SAMPLE_KEY.match(key)
        if match and match["name"] in wanted and key not in wanted:
            per_sample.setdefault(match["name"], {})[int(match["index"])] = arrays.pop(key)
    if per_sample:
        return _npz_per_sample(path, specs, option, arrays, per_sample)
    unknown = sorted(set(arrays) - wanted - {LABELS_KEY})
    missing = sorted(wanted - set(arrays))
    if missing or unknown:
        raise ConfigError(
            f"{option} {path}: keys must be the model's input names {sorted(wanted)} (or NAME[i], one "
            f"array per sample); missing {missing}, unexpected {unknown}"
        )
    counts = {name: arrays[name].shape[0] if arrays[name].ndim else 0 for name in wanted}
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise ConfigError(
            f"{option} {path}: every key needs the same, non-zero number of samples, got {counts}"
        )
    count = next(iter(counts.values()))
    for spec in specs:
        array = arrays[spec.name]
        _check_dtype(path, option, spec, array)
        if not fits((1, *array.shape[1:]), spec):
            raise ConfigError(
                f"{option} {path}: '{spec.name}' samples have shape {list(array.shape[1:])}, the model "
                f"expects {_fmt(spec.shape[1:])} (stack samples on the first axis, or give samples of "
                "different shapes as NAME[0], NAME[1], ...)"
            )
    feeds = [{s.name: np.ascontiguousarray(arrays[s.name][i : i + 1]) for s in specs} for i in range(count)]
    return SampleSet(
        feeds=feeds,
        labels=_npz_labels(arrays, wanted, count),
        sources=[f"{path.name}[{i}]" for i in range(count)],
    )


def _npz_per_sample(
    path: Path,
    specs: list[TensorSpec],
    option: str,
    rest: dict[str, np.ndarray],
    per_sample: dict[str, dict[int, np.ndarray]],
) -> SampleSet:
    """Samples given one array each, `NAME[i]`: every input needs the same indexes 0..n-1."""
    wanted = {s.name for s in specs}
    unknown = sorted(set(rest) - {LABELS_KEY})
    missing = sorted(wanted - set(per_sample))
    if missing or unknown:
        raise ConfigError(
            f"{option} {path}: with one array per sample every key is NAME[i] for the model's inputs "
            f"{sorted(wanted)}; missing {missing}, unexpected {unknown}"
        )
    count = len(per_sample[specs[0].name])
    for spec in specs:
        indexes = sorted(per_sample[spec.name])
        if indexes != list(range(count)):
            gap = next((i for i in range(count) if i not in per_sample[spec.name]), count)
            raise ConfigError(
                f"{option} {path}: '{spec.name}' samples must be numbered {spec.name}[0] to "
                f"{spec.name}[{count - 1}] like '{specs[0].name}'s; {spec.name}[{gap}] is missing"
            )
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for spec in specs:
        for index, array in per_sample[spec.name].items():
            _check_dtype(path, option, spec, array, f"{spec.name}[{index}]")
            sample = array if array.ndim == len(spec.shape) else array[None]
            if not fits(sample.shape, spec):
                raise ConfigError(
                    f"{option} {path}: '{spec.name}[{index}]' has shape {list(array.shape)}, the model "
                    f"expects {_fmt(spec.shape)} (symbolic dims may differ per sample)"
                )
            feeds[index][spec.name] = np.ascontiguousarray(sample)
    return SampleSet(
        feeds=feeds,
        labels=_npz_labels(rest, wanted, count),
        sources=[f"{path.name}[{i}]" for i in range(count)],
    )


def _check_dtype(
    path: Path, option: str, spec: TensorSpec, array: np.ndarray, key: str | None = None
) -> None:
    if array.dtype != np.dtype(spec.dtype):
        raise ConfigError(
            f"{option} {path}: '{key or spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}"
        )


def _npz_labels(arrays: dict[str, np.ndarray], wanted: set[str], count: int) -> list[int] | None:
    if LABELS_KEY in arrays and LABELS_KEY not in wanted:
        return [int(v) for v in arrays[LABELS_KEY].reshape(-1)[:count]]
    return None
