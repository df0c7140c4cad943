"""The text-recognition task (edge.tasks.text_recognition): greedy CTC decoding of per-step scores
with the charset as labels, in both output layouts, read from a manifest like any other task."""

from __future__ import annotations

import numpy as np
import pytest

from edge.package import Manifest
from edge.tasks import make_decoder
from edge.tasks.base import DecoderContext
from edge.tasks.text_recognition import TextRecognitionConfig

CHARSET = ["", "a", "b", " ", "c"]  # index 0: the CTC blank; a space is a class like any other


def steps(indices: list[int], classes: int = len(CHARSET), peak: float = 8.0) -> np.ndarray:
    """[T, C] scores whose best class per step is `indices`."""
    scores = np.zeros((len(indices), classes), np.float32)
    scores[np.arange(len(indices)), indices] = peak
    return scores


def decode(scores: np.ndarray, **config: object) -> dict[str, object]:
    decoder = TextRecognitionConfig.model_validate({"type": "text-recognition", **config}).decoder(
        DecoderContext(labels=tuple(CHARSET))
    )
    return dict(decoder([scores], None))


def test_repeats_merge_blanks_separate_and_drop() -> None:
    # a a _ a b b _ _ space c -> "aab c": a blank between two a's keeps both
    sequence = [1, 1, 0, 1, 2, 2, 0, 0, 3, 4]
    result = decode(steps(sequence)[:, None, :])  # [T, 1, C], ddddocr's layout
    assert result["type"] == "text-recognition" and result["text"] == "aab c"
    probability = np.exp(8.0) / (np.exp(8.0) + len(CHARSET) - 1)
    assert result["confidence"] == pytest.approx(probability, abs=1e-6)


def test_both_layouts_and_auto_agree() -> None:
    scores = steps([2, 0, 4, 4, 1])
    tnc, ntc = scores[:, None, :], scores[None]
    assert decode(tnc)["text"] == decode(ntc)["text"] == "bca"
    assert decode(tnc, layout="TNC")["text"] == decode(ntc, layout="NTC")["text"] == "bca"


def test_only_blanks_is_an_empty_text_and_another_blank_index_is_honoured() -> None:
    assert decode(steps([0, 0, 0])) == {"type": "text-recognition", "text": "", "confidence": 1.0}
    # with blank 4 ('c'), index 0 ('') is an ordinary class that prints nothing
    assert decode(steps([4, 1, 4, 1]), blank=4)["text"] == "aa"


def test_the_manifest_refuses_a_wrong_key_naming_it() -> None:
    data = {
        "schema": "edge.package/1", "name": "ocr", "version": "1", "created": "2026-01-01T00:00:00Z",
        "task": "text-recognition",
        "artifacts": [{"path": "m.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}],
        "inputs": [{"name": "input1", "shape": [1, 1, 64, "image_width"], "dtype": "float32"}],
        "outputs": [{"name": "387", "shape": ["seqlen", 1, 5]}],
        "postprocess": {"type": "text-recognition", "layout": "TNC"},
    }  # fmt: skip
    manifest = Manifest.model_validate(data)
    assert make_decoder(manifest, CHARSET)([steps([1, 2])[:, None, :]], None)["text"] == "ab"
    with pytest.raises(ValueError, match="layout"):
        Manifest.model_validate({**data, "postprocess": {"type": "text-recognition", "layout": "CTN"}})
