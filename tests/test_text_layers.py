"""`--prune-layers` (encoder layers dropped, then distilled from the full model) and a transformer `.onnx`
SOURCE with `--tokenizer`, on a randomly initialised 4-layer BERT built with transformers (config only,
no download) and the real all-MiniLM-L6-v2 tokenizer.json. MiniLM itself: the slow test at the end and
benchmarks/transformer_bench.py --prune-layers 0.5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.pipeline import ConvertOptions, convert
from converters.text_layers import MAX_HELD_OUT, drop_layers, prune_and_distill, select_layers
from edge import open_model
from edge.errors import ConfigError
from tests.assets_text import calib_eval_sentences, minilm_folder, tiny_bert_folder, write_lines

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    calib, evaluation = calib_eval_sentences(120, 60)
    root = tmp_path_factory.mktemp("texts")
    return (
        write_lines(root / "calib.txt", calib),
        write_lines(root / "eval.txt", evaluation[:40]),
        evaluation[40:],
    )


@pytest.fixture(scope="module")
def tiny4(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = minilm_folder(cache_dir) / "tokenizer.json"
    return tiny_bert_folder(tmp_path_factory.mktemp("hf") / "tiny-bert-4", tokenizer, layers=4)


def test_layer_selection_spreads_the_kept_layers_and_keeps_the_last() -> None:
    assert select_layers(6, 0.5) == [1, 3, 5]
    assert select_layers(12, 0.5) == [1, 3, 5, 7, 9, 11]
    assert select_layers(4, 0.75) == [3]
    assert select_layers(6, 1 / 3) == [1, 2, 3, 5]
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="--prune-layers"):
            select_layers(6, bad)


def test_dropped_layers_keep_the_teacher_weights(tiny4: Path) -> None:
    import torch
    from transformers import BertModel

    teacher = BertModel.from_pretrained(str(tiny4)).eval()
    student = drop_layers(teacher, [1, 3])
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert len(teacher.encoder.layer) == 4  # a copy: the teacher is untouched
    for mine, theirs in zip(
        student.encoder.layer, [teacher.encoder.layer[1], teacher.encoder.layer[3]], strict=True
    ):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        out = student(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers


def test_prune_layers_distils_and_packages(
    tiny4: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    import onnx

    calib, evaluation, unseen = texts
    out = tmp_path / "pkg"
    result = convert(
        ConvertOptions(
            source=str(tiny4),
            out=out,
            calib=calib,
            eval=evaluation,
            task="embedding",
            prune_layers=0.5,
            distill_time=900.0,  # a ceiling only: the 40 steps end it, however loaded the machine is
            distill_steps=40,
            distill_lr=3e-4,
            quiet=True,
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["mode"] == "layers" and pruning["kept_layers"] == [1, 3]
    assert pruning["layers_before"] == 4 and pruning["layers_after"] == 2
    assert pruning["params_after"] < pruning["params_before"]
    distillation = pruning["distillation"]
    assert distillation["steps"] == 40 and distillation["stopped"] == "steps", json.dumps(distillation)
    held_out = {int(step): loss for step, loss in distillation["held_out_loss"].items()}
    assert 0 in held_out and len(held_out) >= 3
    # the kept checkpoint is the best held-out one, and training improved on plain layer dropping
    assert held_out[distillation["best_step"]] == min(held_out.values())
    assert distillation["best_step"] > 0 and min(held_out.values()) < held_out[0]
    assert (distillation["samples"], distillation["held_out_samples"]) == (96, 24)  # a fifth never trained on

    # the pruned graph has half the encoder layers of the full one
    def layer_norms(path: Path) -> int:
        return sum(n.op_type == "LayerNormalization" for n in onnx.load(str(path)).graph.node)

    teacher_norms = 1 + 2 * 4  # embeddings + two per layer
    assert layer_norms(out / "model.fp32.onnx") == 1 + 2 * 2 < teacher_norms
    teacher = manifest["pruning"]["teacher"]
    assert set(teacher["int8"]) == {"cosine_mean", "cosine_min", "nn_agreement"}
    assert teacher["passed"] == (teacher["int8"]["cosine_mean"] >= 0.95)
    assert result.gate_passed == (manifest["metrics"]["gate"]["passed"] and teacher["passed"])
    assert "pruned_fp32" in manifest["metrics"]["latency_ms"]
    with open_model(out) as model:
        vector = np.asarray(model.infer(unseen[0])["vector"])
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1.0) < 1e-4


def test_many_texts_set_aside_at_most_max_held_out(tiny4: Path, tmp_path: Path) -> None:
    from converters.huggingface import load_folder
    from edge.package import TensorSpec, sha256_file
    from edge.processing.text import TextConfig, TextPreprocessor, buckets_for

    many, _ = calib_eval_sentences(2000, 0, large=True)
    source = load_folder(tiny4, "embedding", tmp_path)
    tokenizer = source.tokenizer_json
    config = TextConfig(
        tokenizer="tokenizer.json", sha256=sha256_file(tokenizer), bytes=tokenizer.stat().st_size, max_length=64,
        buckets=buckets_for(64),
    )  # fmt: skip
    specs = [TensorSpec(name=n, shape=["batch", "sequence"], dtype="int64") for n in source.input_names]
    pre = TextPreprocessor.from_file(tokenizer, config, specs)
    result = prune_and_distill(source, pre, many, 0.5, budget_s=0, max_steps=2)
    assert (result.train_texts, result.held_out_texts) == (2000 - MAX_HELD_OUT, MAX_HELD_OUT)
    assert result.steps == 2 and [step for step, _ in result.held_out] == [0, 2]


def test_recipes_are_chosen_on_calibration_texts_not_the_scored_ones(
    tiny4: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    calib, evaluation, _ = texts
    out = tmp_path / "pkg"
    convert(
        ConvertOptions(source=str(tiny4), out=out, calib=calib, eval=evaluation, task="embedding", quiet=True)
    )
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["selection_samples"] == 120 // 3  # the last third of the calibration texts
    shipped = next(r for r in metrics["recipes"] if r["recipe"] == metrics["recipe"])
    faster = [
        r
        for r in metrics["recipes"]
        if r["selection_passed"]
        and r["latency_ms_p50"] is not None
        and r["latency_ms_p50"] < shipped["latency_ms_p50"]
    ]
    assert shipped["selection_passed"] and not faster
    assert metrics["gate"]["passed"] == shipped["passed"]  # the verdict is the evaluation texts'


def _export_last_hidden_state(folder: Path, out: Path, *, fixed_sequence: bool = False) -> Path:
    import torch
    from transformers import BertModel

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0]])
    axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    if not fixed_sequence:
        for value in axes.values():
            value[1] = "sequence"
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Hidden(), (ids, (ids > 0).long()), str(out / "model.onnx"), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], dynamic_axes=axes,
    )  # fmt: skip
    return out / "model.onnx"


def test_a_transformer_onnx_with_its_tokenizer_converts_to_a_text_package(
    tiny4: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    """A per-token output is mean-pooled over the mask in the graph: the package serves what
    sentence-transformers computes from the same model."""
    import torch
    from transformers import AutoTokenizer, BertModel

    calib, evaluation, unseen = texts
    onnx_path = _export_last_hidden_state(tiny4, tmp_path / "exported")
    out = tmp_path / "pkg"
    done = subprocess.run(
        [sys.executable, "-m", "converters.cli", str(onnx_path), "--tokenizer", str(tiny4 / "tokenizer.json"),
         "--calib", str(calib), "--eval", str(evaluation), "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "embedding" and [i["name"] for i in manifest["inputs"]] == [
        "input_ids",
        "attention_mask",
    ]
    assert manifest["metrics"]["pooling"] == "mean" and manifest["outputs"][0]["shape"] == ["batch", 32]
    assert manifest["metrics"]["export"] == {"exporter": "none (ONNX source)", "pooling_appended": True}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny4))
    bert = BertModel.from_pretrained(str(tiny4)).eval()
    with open_model(out) as model:
        for text in unseen[:4]:
            batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            with torch.no_grad():
                hidden = bert(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            reference = ((hidden * mask).sum(1) / mask.sum(1))[0].numpy()
            reference /= np.linalg.norm(reference)
            assert float(np.asarray(model.infer(text)["vector"]) @ reference) > 0.99, text
    # the same graph in a folder beside its tokenizer.json, no --tokenizer
    (tmp_path / "exported" / "tokenizer.json").write_bytes((tiny4 / "tokenizer.json").read_bytes())
    again = convert(
        ConvertOptions(
            source=str(tmp_path / "exported"), out=tmp_path / "pkg2", calib=calib, eval=evaluation, quiet=True
        )
    )
    assert again.manifest.task == "embedding"


def test_an_onnx_with_a_fixed_sequence_or_no_tokenizer_is_refused(
    tiny4: Path, texts: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    calib = texts[0]
    fixed = _export_last_hidden_state(tiny4, tmp_path / "fixed", fixed_sequence=True)

    def attempt(**options: object) -> None:
        convert(ConvertOptions(source=str(fixed), out=tmp_path / "o", calib=calib, quiet=True, **options))  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="fixed sequence length 8"):
        attempt(tokenizer=tiny4 / "tokenizer.json")
    with pytest.raises(ConfigError, match="--tokenizer .*missing.json: file not found"):
        attempt(tokenizer=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="--prune-layers: .* is an ONNX graph"):
        attempt(tokenizer=tiny4 / "tokenizer.json", prune_layers=0.5)


@pytest.mark.slow
def test_minilm_with_half_its_layers_distils_towards_the_full_model(cache_dir: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 with layers 1, 3, 5 kept, distilled for two minutes on sentences from this
    machine's text: the held-out loss falls from plain layer dropping, the package serves 384-d unit
    vectors and records its cosine to the full model (the figure itself: benchmarks/transformer_bench.py)."""
    calib, evaluation = calib_eval_sentences(400, 100)
    out = tmp_path / "minilm-half"
    result = convert(
        ConvertOptions(
            source=str(minilm_folder(cache_dir)),
            out=out,
            calib=write_lines(tmp_path / "calib.txt", calib),
            eval=write_lines(tmp_path / "eval.txt", evaluation[:60]),
            task="embedding",
            prune_layers=0.5,
            distill_time=120.0,
            max_drop=100.0,
            quiet=True,
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["kept_layers"] == [1, 3, 5] and pruning["layers_after"] == 3
    held_out = {int(step): loss for step, loss in pruning["distillation"]["held_out_loss"].items()}
    assert min(held_out.values()) < 0.7 * held_out[0], held_out
    teacher = pruning["teacher"]
    assert 0.5 < teacher["int8"]["cosine_mean"] <= 1.0 and result.out == out
    with open_model(out) as model:
        vectors = np.array([model.infer(text)["vector"] for text in evaluation[60:]])
    assert vectors.shape == (40, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
