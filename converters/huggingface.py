"""SOURCE = a Hugging Face model folder: `config.json`, weights (`model.safetensors`), tokenizer files, and
for sentence-transformers models `modules.json` with its `1_Pooling/config.json`.

Loaded offline (`local_files_only=True`) with `transformers`; wrapped so the graph takes the tokenizer's
outputs (`input_ids`, `attention_mask`, `token_type_ids` when the model has them) and returns what the
task serves: the pooled sentence embedding (`embedding`: mean over the tokens the attention mask keeps,
the [CLS] token, max, or mean/sqrt(len), as `1_Pooling` says) or the logits (`text-classification`, labels
from `id2label`). Exported with the TorchScript exporter at opset 17 with symbolic `batch` and `sequence`
axes: the graph shape ONNX Runtime's transformer optimizer is written for (on MiniLM it fuses
EmbedLayerNormalization, 6 Attention, 12 SkipLayerNormalization, 6 BiasGelu), which the int8 recipes
start from.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from edge.errors import ConfigError, PackageError
from edge.processing.text import TOKEN_INPUTS

TextTask = Literal["embedding", "text-classification"]
Pooling = Literal["mean", "cls", "max", "mean_sqrt_len"]
EXPORT_OPSET = 17
DEFAULT_MAX_LENGTH = 128


def is_huggingface_folder(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and (path / "config.json").is_file()


@dataclass(frozen=True)
class HuggingFaceSource:
    folder: Path
    name: str
    task: TextTask
    module: torch.nn.Module  # tokens in, pooled embedding / logits out
    input_names: list[str]
    output_name: str
    pooling: Pooling | None  # embedding only
    labels: list[str] | None  # text-classification only
    tokenizer_json: Path
    max_length: int
    model_type: str
    num_heads: int
    hidden_size: int


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def sentence_transformers_pooling(folder: Path) -> Pooling | None:
    """The pooling `modules.json` names (its Pooling module's config), or None for a plain model."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{modules_path}: not readable JSON: {exc}") from exc
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            config = _read_json(folder / str(module.get("path", "")) / "config.json")
            for key, pooling in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
            ):
                if config.get(key):
                    return pooling  # type: ignore[return-value]
            raise ConfigError(f"{folder / str(module.get('path', ''))}/config.json: no pooling mode is set")
    return None


def _max_length(folder: Path, tokenizer_json: Path, position_limit: int) -> int:
    """The sequence length the model was trained for: the tokenizer's own truncation, else
    sentence-transformers' max_seq_length, else the tokenizer config's model_max_length; capped by the
    position embeddings."""
    candidates: list[object] = []
    truncation = _read_json(tokenizer_json).get("truncation")
    if isinstance(truncation, dict):
        candidates.append(truncation.get("max_length"))
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        if (folder / name).is_file():
            candidates.append(_read_json(folder / name).get(key))
    for value in candidates:
        if isinstance(value, int) and 2 <= value <= 1 << 20:
            return min(value, position_limit)
    return min(DEFAULT_MAX_LENGTH, position_limit)


def _tokenizer_json(folder: Path, work: Path) -> Path:
    """The folder's tokenizer.json, or one written from its slow tokenizer files by `transformers`."""
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:  # OSError, ValueError, and whatever a tokenizer class raises
        raise ConfigError(
            f"{folder}: no tokenizer.json and no tokenizer transformers can load: {exc}"
        ) from exc
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{folder}: no tokenizer.json, and its tokenizer has no fast (Rust) form")
    out = work / "tokenizer.json"
    backend.save(str(out))
    return out


def load_folder(folder: Path, task: str | None, work: Path) -> HuggingFaceSource:
    """Load the model offline and wrap it for export. Errors name the folder and what is missing."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")) and not any(
        folder.glob("model-*.safetensors")
    ):
        raise ConfigError(f"{folder}: no weights (model.safetensors) in the Hugging Face folder")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars on a converter's stderr
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        architectures = [str(a) for a in (getattr(config, "architectures", None) or [])]
        chosen: TextTask
        if task is None:
            classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
            chosen = "text-classification" if classifier else "embedding"
        elif task in ("embedding", "text-classification"):
            chosen = task  # type: ignore[assignment]
        else:
            raise ConfigError(
                f"--task {task}: a Hugging Face folder converts as embedding or text-classification"
            )
        loader = AutoModelForSequenceClassification if chosen == "text-classification" else AutoModel
        try:
            model = loader.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unusable folders
            raise ConfigError(f"{folder}: transformers cannot load it as {chosen}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    model.eval()
    accepted = inspect.signature(model.forward).parameters
    input_names = [name for name in TOKEN_INPUTS if name in accepted]
    if "input_ids" not in input_names:
        raise ConfigError(f"{folder}: the model's forward takes no input_ids; not a text model")
    tokenizer_json = _tokenizer_json(folder, work)
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    labels = None
    pooling: Pooling | None = None
    if chosen == "text-classification":
        id2label = getattr(config, "id2label", None) or {}
        labels = [str(id2label.get(i, i)) for i in range(int(config.num_labels))]
        module: torch.nn.Module = _Logits(model, input_names)
        output_name = "logits"
    else:
        pooling = sentence_transformers_pooling(folder) or "mean"
        module = _Pooled(model, input_names, pooling)
        output_name = "sentence_embedding"
    return HuggingFaceSource(
        folder=folder,
        name=_model_name(folder),
        task=chosen,
        module=module.eval(),
        input_names=input_names,
        output_name=output_name,
        pooling=pooling,
        labels=labels,
        tokenizer_json=tokenizer_json,
        max_length=_max_length(folder, tokenizer_json, positions),
        model_type=str(getattr(config, "model_type", "bert")),
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
    )


def _model_name(folder: Path) -> str:
    """A readable name: the folder's, or its parent's when the folder is a generic `model`."""
    resolved = folder.resolve()
    name = resolved.name if resolved.name not in ("model", "") else resolved.parent.name
    return name or "text-model"


class _Wrapped(torch.nn.Module):
    """The model with keyword inputs in a fixed positional order (ONNX inputs are positional)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def run(self, *tensors: torch.Tensor) -> object:
        return self.model(**dict(zip(self.input_names, tensors, strict=True)))


class _Logits(_Wrapped):
    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.run(*tensors).logits  # type: ignore[attr-defined]


class _Pooled(_Wrapped):
    def __init__(self, model: torch.nn.Module, input_names: list[str], pooling: Pooling) -> None:
        super().__init__(model, input_names)
        self.pooling = pooling

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        hidden = self.run(*tensors).last_hidden_state  # type: ignore[attr-defined]
        names = self.input_names
        mask = tensors[names.index("attention_mask")] if "attention_mask" in names else None
        return pool_hidden(hidden, mask, self.pooling)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """The sentence embedding from the last hidden states (batch, tokens, hidden), as `1_Pooling` says:
    only the tokens the attention mask keeps count."""
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.int64)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    if pooling == "mean_sqrt_len":
        return summed / counts.sqrt()
    return summed / counts


def transformers_model(source: HuggingFaceSource) -> torch.nn.Module:
    """The `transformers` model inside the export wrapper (what layer pruning edits)."""
    assert isinstance(source.module, _Wrapped)
    return source.module.model


def with_model(source: HuggingFaceSource, model: torch.nn.Module) -> HuggingFaceSource:
    """`source` serving another `transformers` model of the same kind (a layer-pruned student)."""
    module: torch.nn.Module = (
        _Pooled(model, source.input_names, source.pooling)
        if source.pooling is not None
        else _Logits(model, source.input_names)
    )
    return dataclasses.replace(source, module=module.eval())


def export_text_onnx(source: HuggingFaceSource, example: dict[str, np.ndarray], out_path: Path) -> float:
    """Export with symbolic batch and sequence axes; returns the largest |ONNX - torch| on `example`."""
    tensors = tuple(torch.from_numpy(example[name]) for name in source.input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in source.input_names}
    axes[source.output_name] = {0: "batch"}
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.jit", "transformers")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            reference = source.module(*tensors).numpy()
            torch.onnx.export(
                source.module,
                tensors,
                str(out_path),
                dynamo=False,
                opset_version=EXPORT_OPSET,
                input_names=source.input_names,
                output_names=[source.output_name],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise PackageError(f"{source.folder}: ONNX export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    from converters.accuracy import session

    got = session(out_path).run(None, example)[0]
    return float(np.max(np.abs(got - reference)))
