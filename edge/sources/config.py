"""Source config models: unknown keys are errors, defaults work for a file or a camera at index 0."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SampleFormat = Literal["s16le", "s16be", "s32le", "s32be", "f32le", "f32be", "f64le", "u8", "s8"]


class VideoSourceConfig(BaseModel):
    """A camera: a video file, a USB device (/dev/videoN or an index), or an RTSP/HTTP stream."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["video"] = "video"
    uri: str | int = 0
    fps: float | None = Field(
        default=None,
        gt=0,
        description="cap on frames delivered per second; cameras, streams and realtime files skip the frames "
        "over it; a file with realtime false delivers every frame, one per 1/fps",
    )
    loop: bool = Field(default=False, description="files only: restart at the end instead of finishing")
    realtime: bool = Field(
        default=True,
        description="files only. true: play at the file's own frame rate like a camera (an fps cap skips "
        "frames). false with fps: every frame, paced at fps. false without fps: decoded flat out, as fast "
        "as the reader takes them, none skipped (benchmarks)",
    )
    width: int | None = Field(default=None, gt=0, description="USB cameras: requested frame width")
    height: int | None = Field(default=None, gt=0, description="USB cameras: requested frame height")
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str | int) -> str | int:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("must not be empty")
            if value.isdigit():
                return int(value)
        elif value < 0:
            raise ValueError("a camera index must be >= 0")
        return value

    @model_validator(mode="after")
    def _backoff_ordered(self) -> VideoSourceConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class SensorSourceConfig(BaseModel):
    """Fixed-format samples from a serial port, a file, stdin ("-") or a WAV file, cut into windows."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["sensor"] = "sensor"
    uri: str
    baud: int = Field(default=115200, gt=0)
    format: SampleFormat = "s16le"
    channels: int = Field(default=1, ge=1)
    sample_rate: int | None = Field(
        default=None, gt=0, description="samples per second per channel; WAV files bring their own"
    )
    window: int = Field(default=16000, ge=1, description="samples per channel in one frame")
    hop: int | None = Field(default=None, ge=1, description="samples between window starts (default window)")
    loop: bool = Field(default=False, description="plain files and WAV: restart at the end")
    realtime: bool | None = Field(
        default=None,
        description="files: deliver windows at sample_rate like a live sensor (default: when the rate is known)",
    )
    read_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="serial: reopen the port after this long without a byte (default: a quiet sensor is fine)",
    )
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> SensorSourceConfig:
        if self.hop is not None and self.hop > self.window:
            raise ValueError(f"hop ({self.hop}) must not exceed window ({self.window})")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.realtime and self.sample_rate is None and not self.uri.lower().endswith(".wav"):
            raise ValueError("realtime needs sample_rate")
        return self

    @property
    def hop_samples(self) -> int:
        return self.hop if self.hop is not None else self.window


SourceConfig = Annotated[Union[VideoSourceConfig, SensorSourceConfig], Field(discriminator="type")]  # noqa: UP007
