"""The voice-activity task (edge.tasks.voice_activity): one speech probability per window, flagged at
the package's threshold, read from an output chosen by index or name; its payload is the schema's."""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from edge.errors import ConfigError
from edge.package import Manifest
from edge.publish.payload import prediction_schema
from edge.tasks import make_decoder
from edge.tasks.base import DecoderContext
from edge.tasks.voice_activity import VoiceActivityConfig
from tests.test_payload_schema import sample

AKIKI_OUTPUTS = ("probability", "h_out")


def decode(outputs: list[np.ndarray], **config: object) -> dict[str, object]:
    decoder = VoiceActivityConfig.model_validate({"type": "voice-activity", **config}).decoder(
        DecoderContext(output_names=AKIKI_OUTPUTS)
    )
    return dict(decoder(outputs, None))


def test_speech_is_the_probability_at_the_threshold() -> None:
    state = np.zeros((1, 1, 128), np.float32)
    assert decode([np.array([[0.93]], np.float32), state]) == {
        "type": "voice-activity",
        "speech": True,
        "probability": pytest.approx(0.93),
    }
    assert decode([np.array([[0.49]], np.float32), state])["speech"] is False
    assert decode([np.array([[0.49]], np.float32), state], threshold=0.4)["speech"] is True
    logit = decode([np.array([[2.0]], np.float32)], logits=True)
    assert logit["probability"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6) and logit["speech"]


def test_the_output_is_found_by_name_and_a_wrong_one_is_named() -> None:
    outputs = [np.zeros((1, 1, 128), np.float32), np.array([0.8], np.float32)]
    decoder = VoiceActivityConfig(type="voice-activity", output="probability").decoder(
        DecoderContext(output_names=("h_out", "probability"))
    )
    assert decoder(outputs, None)["probability"] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="postprocess.output: 'prob' is not an output of the model"):
        VoiceActivityConfig(type="voice-activity", output="prob").decoder(
            DecoderContext(output_names=AKIKI_OUTPUTS)
        )
    with pytest.raises(ConfigError, match="one value per window, output 0 holds 128"):
        decode(outputs, output=0)  # the state, not the probability


def test_the_manifest_reads_it_and_the_payload_validates() -> None:
    data = {
        "schema": "edge.package/1", "name": "vad", "version": "1", "created": "2026-01-01T00:00:00Z",
        "task": "voice-activity",
        "artifacts": [{"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}],
        "inputs": [{"name": "audio_with_context", "shape": [1, 576], "dtype": "float32"}],
        "outputs": [{"name": "probability", "shape": [1, 1]}, {"name": "h_out", "shape": [1, 1, 128]}],
        "postprocess": {"type": "voice-activity", "output": "probability", "threshold": 0.6},
    }  # fmt: skip
    manifest = Manifest.model_validate(data)
    result = make_decoder(manifest)([np.array([[0.7]], np.float32), np.zeros((1, 1, 128), np.float32)], None)
    assert result["speech"] is True
    with pytest.raises(ValueError, match="threshold"):
        Manifest.model_validate(
            {
                **manifest.model_dump(mode="json", by_alias=True),
                "postprocess": {"type": "voice-activity", "threshold": 2},
            }
        )
    payload = sample(result)
    payload["seq"] = 1  # the outbox's to assign
    validator = jsonschema.Draft202012Validator(prediction_schema())
    validator.validate(payload)
    assert not validator.is_valid({**payload, "result": {**result, "speech": "yes"}})
    assert not validator.is_valid({**payload, "result": {**result, "probability": 1.5}})
