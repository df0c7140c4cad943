"""The offline English corpora: the large one grows the small one without changing it, and its split never
hands an evaluation sentence (of either corpus) to calibration."""

from __future__ import annotations

import hashlib

import pytest

from tests.assets_text import DOCS, _doc_files, calib_eval_sentences, english_sentences


def test_the_large_corpus_holds_the_small_one_and_many_more_sentences() -> None:
    small = english_sentences()
    large = english_sentences(corpus="large")
    assert len(set(large)) == len(large)
    assert set(small) <= set(large)
    # the standard library's docstrings alone are some 16,000 sentences on Python 3.11; /usr/share/doc adds more
    assert len(large) > 4 * len(small) > 10_000
    # ordered by hash, so any prefix mixes all the sources
    assert large == sorted(large, key=lambda s: hashlib.sha256(s.encode()).digest())
    assert english_sentences() == small  # asking for the large one leaves the small one as it was


def test_a_sentence_falls_in_the_same_half_in_both_corpora() -> None:
    small_calib, small_eval = calib_eval_sentences(1400, 1400)  # nearly all of each half
    large_calib, large_eval = calib_eval_sentences(10_000, 10_000, large=True)
    assert not set(large_calib) & set(large_eval)
    assert not set(large_calib) & set(small_eval) and not set(small_calib) & set(large_eval)


def test_the_split_refuses_more_than_there_is_and_an_unknown_corpus() -> None:
    with pytest.raises(RuntimeError, match="asked for"):
        calib_eval_sentences(10_000, 10)
    with pytest.raises(ValueError, match="corpus"):
        english_sentences(corpus="huge")


@pytest.mark.skipif(not DOCS.is_dir(), reason="no /usr/share/doc on this machine")
def test_changelogs_and_copyright_files_are_not_read_as_prose() -> None:
    names = [path.name.lower() for path in _doc_files()]
    assert names and all(n.startswith("readme") or n.removesuffix(".gz").endswith(".txt") for n in names)
    assert not [n for n in names if "changelog" in n or "copyright" in n]
