"""Text models end to end: a Hugging Face folder -> edge-convert -> package with its tokenizer ->
`open_model(...).infer("a sentence")`, checked against transformers run directly on the same folder.

The fast tests use a randomly initialised 2-layer BERT (built with transformers, saved as a folder) with
the real all-MiniLM-L6-v2 tokenizer.json; the slow one converts all-MiniLM-L6-v2 itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from converters.pipeline import ConvertOptions, convert
from edge import open_model
from edge.errors import PackageError
from edge.package import load_package
from edge.processing.text import TextConfig
from edge.publish.payload import build_prediction, prediction_schema
from edge.sources.text import text_frame_data
from tests.assets_text import calib_eval_sentences, minilm_folder, tiny_bert_folder, write_lines
from tests.broker import Mosquitto

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = jsonschema.Draft202012Validator(prediction_schema())


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    calib, evaluation = calib_eval_sentences(48, 64)
    root = tmp_path_factory.mktemp("texts")
    return (
        write_lines(root / "calib.txt", calib),
        write_lines(root / "eval.txt", evaluation[:32]),
        evaluation[32:],
    )


@pytest.fixture(scope="module")
def tiny_folder(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = minilm_folder(cache_dir) / "tokenizer.json"
    return tiny_bert_folder(tmp_path_factory.mktemp("hf") / "tiny-bert", tokenizer)


@pytest.fixture(scope="module")
def tiny_package(
    tiny_folder: Path, texts: tuple[Path, Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    calib, evaluation, _ = texts
    out = tmp_path_factory.mktemp("pkg") / "tiny-embedding"
    result = convert(
        ConvertOptions(
            source=str(tiny_folder), out=out, calib=calib, eval=evaluation, task="embedding", quiet=True
        )
    )
    assert result.gate_passed
    return out


def transformers_embedding(folder: Path, text: str) -> np.ndarray:
    """sentence-transformers' recipe written out: mean of the token states the mask keeps, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vector = ((hidden * mask).sum(1) / mask.sum(1))[0].numpy()
    return np.asarray(vector / np.linalg.norm(vector))


def test_infer_a_sentence_matches_transformers(
    tiny_package: Path, tiny_folder: Path, texts: tuple[Path, Path, list[str]]
) -> None:
    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(tiny_package / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    with open_model(tiny_package) as model:
        assert model.task == "embedding" and model.session.loaded.artifact.precision == "int8"
        pre, decode = model.session.text_pre, model.session.decoder
        assert pre is not None
        for text in texts[2][:6]:
            result = model.infer(text)
            assert result["type"] == "embedding" and result["normalized"] is True
            vector = np.asarray(result["vector"])
            assert result["dims"] == vector.size == 32
            assert abs(np.linalg.norm(vector) - 1.0) < 1e-4
            reference = transformers_embedding(tiny_folder, text)
            assert float(vector @ reference) > 0.99, text  # int8, as served
            # the fp32 artifact fed by the same tokenizer path and decoded by the same task
            exact = np.asarray(decode(fp32.run(None, pre(text)), None)["vector"])
            assert float(exact @ reference) > 0.99999, text


def test_text_frames_from_the_text_source_run_through_the_session(tiny_package: Path) -> None:
    with open_model(tiny_package) as model:
        direct = model.infer("A line from a file.")
        from_frame, timings = model.session.infer(text_frame_data("A line from a file."))
    assert from_frame == direct
    assert timings.preprocess >= 0 and timings.inference > 0


def test_token_feeds_use_a_few_bucket_lengths_and_truncate(tiny_package: Path) -> None:
    with open_model(tiny_package) as model:
        pre = model.session.text_pre
        assert pre is not None and pre.lengths == (16, 32, 64, 128)
        lengths = {pre("word " * n)["input_ids"].shape[1] for n in (1, 5, 14, 15, 20, 40, 70, 126, 500)}
        assert lengths == {16, 32, 64, 128}
        long = pre("word " * 500)
        assert long["attention_mask"].sum() == 128
        assert long["input_ids"][0, -1] == pre.tokenizer.token_to_id("[SEP]")
        short = pre("Hi there.")
        kept = int(short["attention_mask"].sum())
        assert short["input_ids"][0, kept:].tolist() == [0] * (16 - kept)  # [PAD]
        assert set(short) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(a.dtype == np.int64 and a.shape == (1, 16) for a in short.values())
    # padding to a bucket does not change the fp32 embedding (the graph pools over the mask only)
    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(tiny_package / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    padded = fp32.run(None, pre.encode("Hi there.", length=128))[0]
    assert np.allclose(padded, fp32.run(None, short)[0], atol=1e-5)


def test_the_tokenizer_is_covered_by_the_manifest_hash(tiny_package: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "pkg"
    shutil.copytree(tiny_package, copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    assert manifest["text"]["tokenizer"] == "tokenizer.json"
    assert (
        manifest["text"]["sha256"] == hashlib.sha256((copy_dir / "tokenizer.json").read_bytes()).hexdigest()
    )
    tokenizer = json.loads((copy_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["[UNK]"] = 99999  # a tampered vocabulary
    (copy_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(
        PackageError, match=r"text\.tokenizer: 'tokenizer.json' is \d+ bytes|text\.tokenizer: sha256"
    ):
        load_package(copy_dir)


def test_text_config_is_typed_and_closed() -> None:
    good = {"tokenizer": "tokenizer.json", "sha256": "0" * 64, "bytes": 1}
    assert TextConfig.model_validate(good).lengths == (16, 32, 64, 128)
    with pytest.raises(ValueError, match="padding_side"):
        TextConfig.model_validate({**good, "padding_side": "left"})
    with pytest.raises(ValueError, match="max_length"):
        TextConfig.model_validate({**good, "max_length": 64, "buckets": [16, 256]})


def test_text_classification_labels_come_from_id2label(
    cache_dir: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    folder = tiny_bert_folder(
        tmp_path / "tiny-cls",
        minilm_folder(cache_dir) / "tokenizer.json",
        classifier_labels=["negative", "positive"],
    )
    calib, evaluation, unseen = texts
    out = tmp_path / "pkg"
    result = convert(ConvertOptions(source=str(folder), out=out, calib=calib, eval=evaluation, quiet=True))
    assert result.manifest.task == "text-classification"  # guessed from the architecture
    with open_model(out) as model:
        got = model.infer(unseen[0])
    assert got["type"] == "text-classification"
    assert sorted(item["label"] for item in got["top_k"]) == ["negative", "positive"]
    assert abs(sum(item["score"] for item in got["top_k"]) - 1.0) < 1e-5
    VALIDATOR.validate(payload(got))


def payload(result: dict[str, object]) -> dict[str, object]:
    doc = build_prediction(
        device_id="dev-1",
        boot_id=str(uuid.uuid4()),
        ts=1795428000.1,
        source={"uri": "/var/lib/edge-infer/in.txt", "frame": 3, "captured_at": 1795428000.0},
        model={"name": "minilm", "version": "1", "sha256": "a" * 64},
        runtime={"backend": "onnxruntime", "provider": "CPUExecutionProvider"},
        latency_ms={"capture_to_publish": 3.0, "preprocess": 0.2, "inference": 2.5, "postprocess": 0.1},
        result=result,
    )
    doc["seq"] = 1
    return doc


def test_the_payload_schema_takes_embeddings_and_refuses_broken_ones(tiny_package: Path) -> None:
    with open_model(tiny_package) as model:
        result = model.infer("Schema check.")
    VALIDATOR.validate(payload(result))
    for key, value in (("vector", ["0.1"]), ("vector", []), ("dims", 0), ("normalized", "yes"), ("extra", 1)):
        broken = copy.deepcopy(result)
        broken[key] = value
        assert not VALIDATOR.is_valid(payload(broken)), key
    missing = {k: v for k, v in result.items() if k != "dims"}
    assert not VALIDATOR.is_valid(payload(missing))
    assert not VALIDATOR.is_valid(payload({"type": "text-classification", "top_k": [{"label": "x"}]}))


def test_cli_errors_name_the_option(tiny_folder: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "converters.cli", str(tiny_folder), "--out", str(tmp_path / "o"), "--quiet", *args],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )  # fmt: skip

    missing = run()
    assert missing.returncode == 2 and "needs --calib texts.txt" in missing.stderr
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\n")
    bad = run("--calib", str(tmp_path / "bad.txt"))
    assert bad.returncode == 2 and f"--calib {tmp_path / 'bad.txt'}: line 2 is not valid UTF-8" in bad.stderr
    wrong = run("--calib", str(tmp_path / "bad.txt"), "--task", "detection")
    assert wrong.returncode == 2 and "--task detection" in wrong.stderr


@pytest.mark.slow
def test_minilm_converts_to_int8_that_matches_fp32(cache_dir: Path, tmp_path: Path) -> None:
    folder = minilm_folder(cache_dir)
    calib, evaluation = calib_eval_sentences(200, 260)
    out = tmp_path / "minilm"
    command = [
        sys.executable, "-m", "converters.cli", str(folder), "--out", str(out), "--task", "embedding",
        "--calib", str(write_lines(tmp_path / "calib.txt", calib)),
        "--eval", str(write_lines(tmp_path / "eval.txt", evaluation[:200])), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800, check=False)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["metrics"]
    names = [r["recipe"] for r in metrics["recipes"]]
    assert "dynamic-int8" in names and "fused+dynamic-int8-per-channel" in names
    assert metrics["size_ratio_int8_fp32"] <= 0.30
    assert manifest["text"]["max_length"] == 128 and manifest["metrics"]["pooling"] == "mean"
    assert (done.returncode == 0) == metrics["gate"]["passed"]
    plain = next(r for r in metrics["recipes"] if r["recipe"] == "dynamic-int8")
    shipped = next(r for r in metrics["recipes"] if r["recipe"] == metrics["recipe"])
    assert shipped["cosine_mean"] > plain["cosine_mean"] and shipped["nn_agreement"] > plain["nn_agreement"]
    # the served vectors, on sentences the converter never saw, against transformers on the folder
    with open_model(out) as model:
        assert model.session.loaded.artifact.precision == "int8"
        cosines = [
            float(np.asarray(model.infer(text)["vector"]) @ transformers_embedding(folder, text))
            for text in evaluation[200:]
        ]
    assert np.mean(cosines) >= 0.99 and np.min(cosines) >= 0.97, (np.mean(cosines), np.min(cosines))


def test_the_daemon_serves_one_prediction_per_line_of_a_text_file(
    tiny_package: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """text source frames -> session -> embedding payloads: every line, in order, each vector the one
    `open_model` gives for that line."""
    import threading

    from edge.config import DaemonConfig
    from edge.daemon import Daemon
    from tests.daemon_helpers import subscribed, wait_until

    lines = texts[2][:20]
    source_file = write_lines(tmp_path / "in.txt", lines)
    config = DaemonConfig.model_validate(
        {
            "device_id": "text-01",
            "profile": "x86-64-avx2",
            "model": str(tiny_package),
            "source": {"type": "text", "uri": str(source_file)},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1, "topic_prefix": "edge"},
            "outbox": {"path": str(tmp_path / "state" / "outbox.db"), "max_bytes": 1 << 20},
            "metrics": None,
            "flush_timeout_s": 10.0,
        }
    )
    with subscribed(mosquitto.port, "edge/text-01/predictions", client_id="text-sub") as sub:
        daemon = Daemon.from_config(config)
        daemon.start()
        thread = threading.Thread(target=daemon.run, name="daemon-run", daemon=True)
        thread.start()
        try:
            assert wait_until(daemon.sources_done.is_set, 60)
            assert sub.wait_for(lambda ms: len(ms) >= len(lines), 30)
        finally:
            daemon.request_stop()
            thread.join(30)
        messages = sorted(sub.payloads(), key=lambda m: m["source"]["frame"])
    assert [m["source"]["frame"] for m in messages] == list(range(len(lines)))
    with open_model(tiny_package) as model:
        for message, line in zip(messages, lines, strict=True):
            VALIDATOR.validate(message)
            assert message["result"]["type"] == "embedding"
            assert np.allclose(message["result"]["vector"], model.infer(line)["vector"], atol=1e-6)


def test_text_requests_over_mqtt_get_one_embedding_per_text(
    tiny_package: Path, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """`{"text": ...}` and `{"texts": [...]}` on `infer` (MQTT 3.1.1 `reply_to`): each text answered with
    its own prediction (`request.index`), the vector `open_model` gives for it."""
    import json as json_module
    import threading

    import paho.mqtt.client as mqtt

    from edge.config import DaemonConfig
    from tests.daemon_helpers import running_daemon, wait_until

    config = DaemonConfig.model_validate(
        {
            "device_id": "text-02",
            "profile": "x86-64-avx2",
            "model": str(tiny_package),
            "requests": {"enabled": True},
            "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "qos": 1},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "metrics": None,
        }
    )
    answers: list[dict[str, object]] = []
    got = threading.Lock()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()

    def on_message(c: object, u: object, message: mqtt.MQTTMessage) -> None:
        with got:
            answers.append(json_module.loads(message.payload))

    client.on_message = on_message
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    client.subscribe("app/answers", qos=1)
    assert subscribed.wait(10)
    sentences = ["the cat sat on the mat", "a dog ran in the park", "it rained all day"]
    try:
        with running_daemon(config) as daemon:
            assert wait_until(lambda: daemon.publisher.connected, 10)
            time.sleep(0.3)
            topic = "edge/text-02/infer"
            one = {"text": sentences[0], "reply_to": "app/answers", "correlation_id": "one"}
            many = {"texts": sentences, "reply_to": "app/answers", "correlation_id": "many"}
            client.publish(topic, json_module.dumps(one), qos=1).wait_for_publish(10)
            client.publish(topic, json_module.dumps(many), qos=1).wait_for_publish(10)
            assert wait_until(lambda: len(answers) == 4, 30), answers
    finally:
        client.loop_stop()
        client.disconnect()
    by_request = {(a["request"]["correlation_id"], a["request"].get("index")): a for a in answers}  # type: ignore[index,union-attr]
    assert set(by_request) == {("one", None), ("many", 0), ("many", 1), ("many", 2)}
    with open_model(tiny_package) as model:
        for (name, index), answer in by_request.items():
            VALIDATOR.validate(answer)
            text = sentences[0] if name == "one" else sentences[int(index or 0)]
            expected = np.asarray(model.infer(text)["vector"])
            assert float(np.dot(expected, np.asarray(answer["result"]["vector"]))) > 0.9999  # type: ignore[index]
