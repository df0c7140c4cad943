"""Image pre-processing driven by a manifest input spec (resize mode, colour order, layout, mean/std, dtype).

The converter calibrates with exactly this code, so the runtime feeds the model what it was calibrated on.
Frames arrive as OpenCV gives them: HxWx3 uint8 BGR (or HxW grayscale).

A spec may leave the width (or the height) symbolic, as a text-line recognizer does: the frame is then
scaled to the fixed side and the other side follows its aspect ratio (`VARIABLE` in `width`/`height`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError
from edge.package import TensorSpec


@dataclass(frozen=True)
class Letterbox:
    """Where the image landed inside the model input, to map boxes back to the frame (normalized 0..1)."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int
    height: int


VARIABLE = -1  # a side the spec leaves symbolic: it follows the frame's aspect ratio


@dataclass(frozen=True)
class ImagePreprocessor:
    height: int
    width: int
    channels: int
    layout: str
    color: str
    resize: str
    mean: np.ndarray
    std: np.ndarray
    dtype: np.dtype
    scale: float | None = None
    zero_point: int | None = None

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> ImagePreprocessor:
        shape = [int(d) if isinstance(d, int) or str(d).isdigit() else -1 for d in spec.shape]
        layout = spec.layout or "NCHW"
        if len(shape) != 4 or layout not in ("NCHW", "NHWC"):
            raise ConfigError(
                f"input '{spec.name}': image pre-processing needs a 4-D NCHW/NHWC shape, got "
                f"{spec.shape} ({layout})"
            )
        _, c, h, w = shape if layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
        if (h <= 0 and w <= 0) or c not in (1, 3):
            raise ConfigError(
                f"input '{spec.name}': a fixed height or width and 1 or 3 channels needed, got {spec.shape}"
            )
        mean = np.asarray(spec.mean if spec.mean is not None else [0.0] * c, np.float32)
        std = np.asarray(spec.std if spec.std is not None else [1.0] * c, np.float32)
        if mean.size not in (1, c) or std.size not in (1, c) or np.any(std == 0):
            raise ConfigError(f"input '{spec.name}': mean/std need 1 or {c} values and std must not be 0")
        return cls(
            height=h,
            width=w,
            channels=c,
            layout=layout,
            color=spec.color or "RGB",
            resize=spec.resize or "stretch",
            mean=mean,
            std=std,
            dtype=np.dtype(spec.dtype),
            scale=spec.scale,
            zero_point=spec.zero_point,
        )

    @property
    def example_hw(self) -> tuple[int, int]:
        """A frame size this input takes (a variable side four times the fixed one): for a warm-up run."""
        if self.width == VARIABLE:
            return self.height, 4 * self.height
        if self.height == VARIABLE:
            return self.width, self.width
        return self.height, self.width

    def fit(self, frame: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Resize per the spec to (height, width); returns the image and the geometry used."""
        import cv2

        fh, fw = frame.shape[:2]
        if self.width == VARIABLE or self.height == VARIABLE:
            scale = self.height / fh if self.width == VARIABLE else self.width / fw
            rw, rh = max(1, round(fw * scale)), max(1, round(fh * scale))
            out = cv2.resize(frame, (rw, rh), interpolation=cv2.INTER_AREA)
            return out, Letterbox(rw / fw, rh / fh, 0.0, 0.0, fw, fh)
        if self.resize == "stretch":
            out = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_AREA)
            return out, Letterbox(self.width / fw, self.height / fh, 0.0, 0.0, fw, fh)
        if self.resize == "center-crop":
            scale = max(self.width / fw, self.height / fh)
            rw, rh = max(self.width, round(fw * scale)), max(self.height, round(fh * scale))
            resized = cv2.resize(frame, (rw, rh), interpolation=cv2.INTER_AREA)
            x0, y0 = (rw - self.width) // 2, (rh - self.height) // 2
            return resized[y0 : y0 + self.height, x0 : x0 + self.width], Letterbox(
                scale, scale, -x0, -y0, fw, fh
            )
        scale = min(self.width / fw, self.height / fh)
        rw, rh = max(1, round(fw * scale)), max(1, round(fh * scale))
        resized = cv2.resize(frame, (rw, rh), interpolation=cv2.INTER_AREA)
        canvas = np.full((self.height, self.width, *frame.shape[2:]), 114, dtype=frame.dtype)
        x0, y0 = (self.width - rw) // 2, (self.height - rh) // 2
        canvas[y0 : y0 + rh, x0 : x0 + rw] = resized
        return canvas, Letterbox(scale, scale, x0, y0, fw, fh)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """A BGR (or gray) uint8 frame -> a batch-of-one tensor for the model, plus the geometry."""
        import cv2

        if frame.ndim == 2:
            frame = frame[:, :, None]
        if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
            raise ValueError(f"frame shape {frame.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
        image, geometry = self.fit(frame)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] == 4:
            image = image[:, :, :3]
        if self.channels == 1 and image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif self.channels == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif self.channels == 3 and self.color == "RGB":
            image = image[:, :, ::-1]
        tensor = self.normalize(image)
        if self.layout == "NCHW":
            tensor = tensor.transpose(2, 0, 1)
        return np.ascontiguousarray(tensor[None]), geometry

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> the model's dtype: (x - mean) / std, then quantized if the input is integer."""
        if self.dtype == np.uint8 and self.scale is None and not self._has_normalization():
            return image.astype(np.uint8, copy=False)
        real = (image.astype(np.float32) - self.mean) / self.std
        if self.dtype.kind in "iu":
            if self.scale is None:
                raise ConfigError("integer model input needs scale and zero_point in the manifest")
            info = np.iinfo(self.dtype)
            q = np.round(real / self.scale) + (self.zero_point or 0)
            return np.clip(q, info.min, info.max).astype(self.dtype)
        return real.astype(self.dtype, copy=False)

    def _has_normalization(self) -> bool:
        return bool(np.any(self.mean != 0) or np.any(self.std != 1))
