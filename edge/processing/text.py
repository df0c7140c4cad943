"""Text pre-processing driven by the manifest's `text` section: the package's own `tokenizer.json` run with
the `tokenizers` library (Rust; no torch, no transformers on the device), truncated to `max_length` and
padded up to the smallest of a few length `buckets`, so a session only ever sees that many shapes.

The converter tokenizes its calibration and evaluation text with this same class, so the runtime feeds
the model exactly what the accuracy gate scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge.errors import PackageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from edge.package import TensorSpec

# What a tokenizer output feeds, by the input names Hugging Face models use.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_BUCKETS = (16, 32, 64, 128)


class TextConfig(BaseModel):
    """The manifest's `text`: which package file is the tokenizer (hashed like an artifact, so the
    signature covers it) and how a string becomes token tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str = Field(description="package-relative path of the Hugging Face tokenizer.json")
    sha256: str
    bytes: int = Field(ge=0)
    max_length: int = Field(default=128, ge=2, description="tokens per text, [CLS] and [SEP] included")
    truncation: bool = Field(default=True, description="cut longer texts to max_length (false: refuse them)")
    buckets: list[int] = Field(
        default_factory=lambda: list(DEFAULT_BUCKETS),
        description="sequence lengths a text is padded up to (the smallest that fits); max_length is one",
    )

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _buckets_fit(self) -> TextConfig:
        if any(b < 2 for b in self.buckets):
            raise ValueError("buckets: every length must be >= 2")
        if any(b > self.max_length for b in self.buckets):
            raise ValueError(f"buckets: every length must be <= max_length ({self.max_length})")
        return self

    @property
    def lengths(self) -> tuple[int, ...]:
        """The padded lengths in use: the buckets, sorted, with max_length always last."""
        return tuple(sorted({*self.buckets, self.max_length}))


def buckets_for(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """The default buckets cut to `max_length`, which is itself the last one."""
    return sorted({*(b for b in buckets if b < max_length), max_length})


class TextPreprocessor:
    """A string -> the model's token feeds (batch of one), padded to a bucket, by the input specs' names."""

    def __init__(self, tokenizer: Tokenizer, config: TextConfig, specs: Sequence[TensorSpec]):
        unknown = [spec.name for spec in specs if spec.name not in TOKEN_INPUTS]
        if unknown or not any(spec.name == "input_ids" for spec in specs):
            raise PackageError(
                f"text model inputs {[s.name for s in specs]}: expected input_ids and optionally "
                f"attention_mask, token_type_ids (not {unknown})"
            )
        self.tokenizer = tokenizer
        self.config = config
        self.specs = list(specs)
        self.lengths = config.lengths
        # The tokenizer file may carry its own padding/truncation: the manifest decides both.
        tokenizer.no_padding()
        if config.truncation:
            tokenizer.enable_truncation(config.max_length)
        else:
            tokenizer.no_truncation()
        self.pad_id = _pad_id(tokenizer)

    @classmethod
    def from_file(cls, path: Path, config: TextConfig, specs: Sequence[TensorSpec]) -> TextPreprocessor:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # a runtime dependency; name it rather than fail deep inside
            raise PackageError(f"{path}: text packages need the 'tokenizers' package: {exc}") from exc
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception for a malformed file
            raise PackageError(f"{path}: not a readable tokenizer.json: {exc}") from exc
        return cls(tokenizer, config, specs)

    def bucket(self, tokens: int) -> int:
        return next((length for length in self.lengths if length >= tokens), self.lengths[-1])

    def encode(self, text: str, length: int | None = None) -> dict[str, np.ndarray]:
        """Token feeds for one text, padded to the smallest bucket that fits (or to `length`)."""
        if not isinstance(text, str):
            raise ValueError(f"expected a text string, got {type(text).__name__}")
        encoding = self.tokenizer.encode(text)
        ids, types = encoding.ids, encoding.type_ids
        limit = self.config.max_length
        if len(ids) > limit:  # only without truncation: the tokenizer cuts (keeping [SEP]) otherwise
            raise ValueError(f"text is {len(ids)} tokens, more than max_length {limit} (truncation off)")
        padded = length if length is not None else self.bucket(len(ids))
        count = min(len(ids), padded)
        arrays = {
            "input_ids": np.full((1, padded), self.pad_id, np.int64),
            "attention_mask": np.zeros((1, padded), np.int64),
            "token_type_ids": np.zeros((1, padded), np.int64),
        }
        arrays["input_ids"][0, :count] = ids[:count]
        arrays["attention_mask"][0, :count] = 1
        arrays["token_type_ids"][0, :count] = types[:count]
        return {spec.name: arrays[spec.name].astype(np.dtype(spec.dtype), copy=False) for spec in self.specs}

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        return self.encode(text)


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0
