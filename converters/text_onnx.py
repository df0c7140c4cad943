"""SOURCE = a transformer `.onnx` the user exported, with its tokenizer: `edge-convert model.onnx
--tokenizer tokenizer.json --calib texts.txt`, or a folder holding `model.onnx` and `tokenizer.json`
(what `optimum-cli export onnx` writes; its `config.json` is read for the task and labels when present).

The graph must take the tokenizer's outputs by their Hugging Face names (`input_ids`, optionally
`attention_mask`, `token_type_ids`), int64 with a free sequence axis (a fixed length is refused: the
runtime pads each text to a bucket). Its first output is what the package serves:
- (batch, hidden): a pooled embedding (`--task embedding`, the default) or logits
  (`--task text-classification`; labels from `config.json`'s `id2label` or `--labels`);
- (batch, tokens, hidden), e.g. `last_hidden_state`: mean-pooled over the attention mask inside the graph
  (sentence-transformers' default; `1_Pooling` in the folder chooses cls/max/mean_sqrt_len), so the
  package serves one vector per text like a converted Hugging Face folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.errors import ConfigError
from edge.processing.text import TOKEN_INPUTS

if TYPE_CHECKING:
    import onnx

    from converters.huggingface import Pooling, TextTask

ONNX_MODEL_NAMES = ("model.onnx",)


def is_text_source(source: Path, tokenizer: Path | None) -> bool:
    """A Hugging Face folder, a folder with model.onnx + tokenizer.json, or an .onnx with --tokenizer
    (checked without importing torch: every conversion asks)."""
    if source.is_dir():
        return (source / "config.json").is_file() or onnx_folder_model(source) is not None
    return tokenizer is not None


@dataclass(frozen=True)
class OnnxTextSource:
    path: Path  # the fp32 graph the pipeline quantizes (the user's, pooling appended when needed)
    name: str
    task: TextTask
    input_names: list[str]
    output_name: str
    pooling: Pooling | None
    labels: list[str] | None
    tokenizer_json: Path
    max_length: int
    model_type: str


def onnx_folder_model(folder: Path) -> Path | None:
    """`model.onnx` of a folder that holds one and a tokenizer.json but no torch weights, else None."""
    if not folder.is_dir() or not (folder / "tokenizer.json").is_file():
        return None
    if any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return None
    return next((folder / name for name in ONNX_MODEL_NAMES if (folder / name).is_file()), None)


def load_onnx_text(
    model_path: Path,
    tokenizer_json: Path | None,
    task: str | None,
    labels: list[str] | None,
    work: Path,
) -> OnnxTextSource:
    import onnx

    from converters.huggingface import DEFAULT_MAX_LENGTH, _max_length, sentence_transformers_pooling

    folder = model_path.parent
    tokenizer = tokenizer_json or folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConfigError(
            f"--tokenizer {tokenizer}: file not found (a transformer .onnx needs its tokenizer.json)"
        )
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ConfigError(f"{model_path}: not a readable ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    unknown = [n for n in names if n not in TOKEN_INPUTS]
    if unknown or "input_ids" not in names:
        raise ConfigError(
            f"{model_path}: inputs {names}: a text model takes input_ids and optionally attention_mask, "
            f"token_type_ids (not {unknown or 'without input_ids'})"
        )
    for graph_input in graph_inputs:
        tensor = graph_input.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type != onnx.TensorProto.INT64 or len(dims) != 2:
            raise ConfigError(f"{model_path}: input {graph_input.name}: expected int64 [batch, sequence]")
        if dims[1].HasField("dim_value"):
            raise ConfigError(
                f"{model_path}: input {graph_input.name} has a fixed sequence length {dims[1].dim_value}; "
                "export it with a symbolic sequence axis (dynamic_axes) so texts can be padded to buckets"
            )
    config = _config(folder)
    output = model.graph.output[0]
    rank = len(output.type.tensor_type.shape.dim)
    chosen = _task(task, config, model_path)
    pooling: Pooling | None = None
    out_path = work / "source.fp32.onnx"
    if rank == 3:
        if chosen != "embedding":
            raise ConfigError(
                f"{model_path}: output {output.name} is per token; --task {chosen} needs logits"
            )
        if "attention_mask" not in names:
            raise ConfigError(f"{model_path}: a per-token output needs an attention_mask input to pool over")
        pooling = sentence_transformers_pooling(folder) or "mean"
        output_name = "sentence_embedding"
        onnx.save(append_pooling(model, output.name, pooling, output_name), str(out_path))
    elif rank == 2:
        output_name = output.name
        if chosen == "embedding":
            pooling = None  # the graph pools already
        shutil.copyfile(model_path, out_path)
    else:
        raise ConfigError(f"{model_path}: output {output.name} has rank {rank}; expected 2 or 3")
    if chosen == "text-classification" and labels is None:
        id2label = config.get("id2label")
        if isinstance(id2label, dict):
            labels = [str(id2label.get(str(i), i)) for i in range(len(id2label))]
    return OnnxTextSource(
        path=out_path,
        name=model_path.stem if model_path.stem != "model" else (folder.resolve().name or "text-model"),
        task=chosen,
        input_names=names,
        output_name=output_name,
        pooling=pooling,
        labels=labels,
        tokenizer_json=tokenizer,
        max_length=_max_length(folder, tokenizer, _int(config.get("max_position_embeddings"), 512))
        if tokenizer.is_file()
        else DEFAULT_MAX_LENGTH,
        model_type=str(config.get("model_type", "bert")),
    )


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and value > 0 else default


def _config(folder: Path) -> dict[str, object]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _task(task: str | None, config: dict[str, object], where: Path) -> TextTask:
    if task in ("embedding", "text-classification"):
        return task  # type: ignore[return-value]
    if task is not None:
        raise ConfigError(f"--task {task}: a transformer .onnx converts as embedding or text-classification")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and any(
        str(a).endswith("ForSequenceClassification") for a in architectures
    ):
        return "text-classification"
    return "embedding"


def append_pooling(model: onnx.ModelProto, hidden: str, pooling: Pooling, output: str) -> onnx.ModelProto:
    """`model` whose only output is `hidden` (batch, tokens, dim) pooled over `attention_mask`."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    axis1 = const("pool_axis1", np.array([1], np.int64))
    axis2 = const("pool_axis2", np.array([2], np.int64))
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["pool_mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_mask_f", axis2], ["pool_mask"]),
    ]
    if pooling == "cls":
        nodes.append(
            helper.make_node("Gather", [hidden, const("pool_zero", np.array(0, np.int64))], [output], axis=1)
        )
    elif pooling == "max":
        nodes += [
            helper.make_node(
                "Sub", [const("pool_one", np.array(1.0, np.float32)), "pool_mask"], ["pool_off"]
            ),
            helper.make_node("Mul", ["pool_off", const("pool_big", np.array(1e9, np.float32))], ["pool_neg"]),
            helper.make_node("Sub", [hidden, "pool_neg"], ["pool_masked"]),
            helper.make_node("ReduceMax", ["pool_masked", axis1], [output], keepdims=0),
        ]
    else:
        nodes += [
            helper.make_node("Mul", [hidden, "pool_mask"], ["pool_kept"]),
            helper.make_node("ReduceSum", ["pool_kept", axis1], ["pool_sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool_mask", axis1], ["pool_count_raw"], keepdims=0),
            helper.make_node(
                "Max", ["pool_count_raw", const("pool_eps", np.array(1e-9, np.float32))], ["pool_count"]
            ),
        ]
        if pooling == "mean_sqrt_len":
            nodes.append(helper.make_node("Sqrt", ["pool_count"], ["pool_denominator"]))
        else:
            nodes.append(helper.make_node("Identity", ["pool_count"], ["pool_denominator"]))
        nodes.append(helper.make_node("Div", ["pool_sum", "pool_denominator"], [output]))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", None]))
    return model
