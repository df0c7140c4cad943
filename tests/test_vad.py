"""A real stateful voice-activity model (akiki's GRU) converted with `--state h:h_out` and served by
`edge-infer run` on a WAV of silence, espeak-ng speech, silence and noise, predictions read from a real
mosquitto: speech windows are flagged, silence and noise are not, and the carried state is what makes it
work (the same windows with the state reset every time miss most of the speech)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import open_model
from tests.assets_audio import VAD_CONTEXT, VAD_HOP, VAD_RATE, akiki_vad_onnx, speech_clip, write_wav
from tests.broker import Mosquitto
from tests.daemon_helpers import subscribed, write_config

REPO = Path(__file__).resolve().parent.parent
WINDOW = VAD_CONTEXT + VAD_HOP  # 576: the sensor source's window/hop give akiki's "320 past + 256 new"
THRESHOLD = 0.5  # akiki-vad.json `threshold`
CACHE = Path(os.environ.get("EDGE_CACHE", Path.home() / ".cache" / "edge-runtime"))

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _windows(samples: np.ndarray) -> np.ndarray:
    starts = range(0, len(samples) - WINDOW + 1, VAD_HOP)
    return np.stack([samples[s : s + WINDOW] for s in starts]).astype(np.float32)


def _convert(tmp_path: Path, calib: np.ndarray, *extra: str) -> subprocess.CompletedProcess[str]:
    np.savez(tmp_path / "calib.npz", audio_with_context=calib)
    return subprocess.run(
        [sys.executable, "-m", "converters.cli", str(akiki_vad_onnx(CACHE)), "--out", str(tmp_path / "vad"),
         "--postprocess", '{"type": "voice-activity", "output": "probability"}', "--state", "h:h_out", "--calib", str(tmp_path / "calib.npz"), "-q", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip


def test_vad_package_runs_on_a_wav_through_the_daemon_with_its_state_carried(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clip = speech_clip(tmp_path)
    # what the daemon reads back from the 16-bit WAV, so the Python API below sees the same samples
    pcm = np.clip(np.round(clip.samples * 32768), -32768, 32767) / 32768
    windows = _windows(pcm)
    # int8 first, as the profile asks; the gate decides (recurrent models often lose too much at int8)
    int8 = _convert(tmp_path, windows, "--profile", "x86-64-avx2")
    if int8.returncode != 0:
        assert int8.returncode == 1 and "accuracy gate" in int8.stderr, int8.stderr
        profile = tmp_path / "x86-64-avx2-fp32.yaml"
        text = (REPO / "device_profiles" / "x86-64-avx2.yaml").read_text()
        profile.write_text(text.replace("precision: int8", "precision: fp32").replace(
            "name: x86-64-avx2", "name: x86-64-avx2-fp32"))  # fmt: skip
        fp32 = _convert(tmp_path, windows, "--profile", str(profile))
        assert fp32.returncode == 0, fp32.stderr
    package = tmp_path / "vad"
    write_wav(tmp_path / "clip.wav", clip.samples)
    config = write_config(
        tmp_path / "edge.yaml",
        device_id="vad-1",
        profile="x86-64-avx2",
        model=str(package),
        source={"type": "sensor", "uri": str(tmp_path / "clip.wav"), "window": WINDOW, "hop": VAD_HOP,
                "realtime": False},
        mqtt={"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
        outbox={"path": str(tmp_path / "outbox.db")},
        metrics=None,
        exit_on_source_end=True,
    )  # fmt: skip
    with subscribed(mosquitto.port, "edge/vad-1/predictions", client_id="vad-sub") as sub:
        done = subprocess.run(
            [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sub.wait_for(lambda ms: len(ms) >= len(windows), 30), (len(sub.payloads()), len(windows))
        by_frame = {m["source"]["frame"]: m["result"] for m in sub.payloads()}
    assert sorted(by_frame) == list(range(len(windows)))
    assert {r["type"] for r in by_frame.values()} == {"voice-activity"}
    carried = np.array([by_frame[i]["probability"] for i in range(len(windows))])
    flagged = np.array([by_frame[i]["speech"] for i in range(len(windows))])
    np.testing.assert_array_equal(flagged, carried >= THRESHOLD)  # the package's threshold is akiki's

    # the window's newest 256 samples are what it scores; judge it by where they are
    newest = np.arange(len(windows)) * VAD_HOP + VAD_CONTEXT + VAD_HOP // 2
    margin = VAD_RATE // 10
    (s0, s1), (n0, n1) = clip.speech, clip.noise
    in_speech = (newest > s0 + margin) & (newest < s1 - margin)
    silent = (newest < s0 - margin) | ((newest > s1 + 10 * margin) & (newest < n0))
    noisy = (newest > n0 + margin) & (newest < n1)
    speech_rate = float(flagged[in_speech].mean())
    assert speech_rate >= 0.8, speech_rate  # words have gaps between them: not every window is voiced
    assert flagged[silent].sum() == 0
    assert float(flagged[noisy].mean()) <= 0.2

    # the same windows with the state reset every time: the state is what finds the speech
    with open_model(package, profile="x86-64-avx2") as model:
        reset = []
        for window in windows:
            model.reset_state()
            reset.append(model.infer(window[:, None])["probability"])
        # and carried through the Python API, it agrees with the daemon window for window
        model.reset_state()
        api = [model.infer(w[:, None])["probability"] for w in windows]
    reset_rate = float((np.array(reset)[in_speech] >= THRESHOLD).mean())
    assert reset_rate < speech_rate - 0.3, (reset_rate, speech_rate)
    assert float(np.abs(np.array(reset) - carried).mean()) > 0.05
    np.testing.assert_allclose(api, carried, atol=1e-4)
