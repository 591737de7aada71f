"""Tokenizers: exact round-trips (property tests), special ids, save/load, and the errors users see."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm.tokenizer import SPECIALS, BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _corpus(n_lines: int = 300) -> list[str]:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while seven wizards box and judge "
             "my quiet sphinx of black quartz").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(n_lines)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(_corpus(), vocab_size=300)


# ----- ByteTokenizer ----------------------------------------------------------------------------------------

@PROPS
@given(text=st.text())
def test_byte_roundtrips_any_text(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert byte_tok.decode(ids) == text


def test_byte_roundtrips_non_ascii_and_emoji(byte_tok):
    text = "héllo wörld — 日本語 😀👍🏽 \x00\t\n"
    ids = byte_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert byte_tok.decode(ids) == text


def test_byte_specials_distinct_and_after_bytes(byte_tok):
    specials = [byte_tok.pad_id, byte_tok.mask_id, byte_tok.eos_id, byte_tok.bos_id]
    assert len(set(specials)) == 4
    assert all(256 <= i < byte_tok.vocab_size for i in specials)
    assert byte_tok.vocab_size == 260
    assert byte_tok.special_ids == set(specials)


def test_byte_literal_special_text_stays_text(byte_tok):
    # "[MASK]" typed by a user is six bytes, never the mask id.
    ids = byte_tok.encode("a [MASK] b")
    assert byte_tok.mask_id not in ids
    assert byte_tok.decode(ids) == "a [MASK] b"


def test_byte_decode_skips_or_names_specials(byte_tok):
    ids = [byte_tok.bos_id, *byte_tok.encode("hi"), byte_tok.mask_id, byte_tok.pad_id, byte_tok.eos_id]
    assert byte_tok.decode(ids) == "hi"
    assert byte_tok.decode(ids, skip_special=False) == "[BOS]hi[MASK][PAD][EOS]"


def test_byte_decode_invalid_utf8_is_replaced_not_raised(byte_tok):
    assert byte_tok.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"


# ----- BPETokenizer -----------------------------------------------------------------------------------------

def test_bpe_train_has_specials_and_vocab(bpe):
    assert bpe.vocab_size == 300
    specials = [bpe.pad_id, bpe.mask_id, bpe.eos_id, bpe.bos_id]
    assert len(set(specials)) == 4
    assert all(0 <= i < bpe.vocab_size for i in specials)
    assert [bpe._tok.id_to_token(i) for i in specials] == list(SPECIALS)


def test_bpe_merges_compress_training_text(bpe, byte_tok):
    line = _corpus()[0]
    assert len(bpe.encode(line)) < len(byte_tok.encode(line))


@PROPS
@given(text=st.text())
def test_bpe_roundtrips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_roundtrips_non_ascii_and_emoji(bpe):
    text = "  héllo wörld — 日本語 😀👍🏽 \x00\t\n  "
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_literal_special_text_stays_text(bpe):
    text = "a [MASK] b [PAD] c [EOS]"
    ids = bpe.encode(text)
    assert not set(ids) & bpe.special_ids
    assert bpe.decode(ids) == text


# ----- save / load ------------------------------------------------------------------------------------------

SAMPLES = ["ROMEO: But, soft! what light through yonder window breaks?", "日本語 😀", "", "the lazy dog."]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_load_gives_identical_encodings(kind, tmp_path, bpe, byte_tok):
    tok = byte_tok if kind == "byte" else bpe
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text())["dlm_tokenizer"] == kind
    loaded = Tokenizer.load(path)
    assert type(loaded) is type(tok)
    assert (loaded.vocab_size, loaded.pad_id, loaded.mask_id, loaded.eos_id, loaded.bos_id) == (
        tok.vocab_size, tok.pad_id, tok.mask_id, tok.eos_id, tok.bos_id)
    for s in SAMPLES:
        assert loaded.encode(s) == tok.encode(s)
        assert loaded.decode(tok.encode(s)) == s


@pytest.mark.parametrize("content", ["garbage{", "", '{"dlm_tokenizer": "sentencepiece"}', "{}"])
def test_load_garbage_raises_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.load(path)


def test_load_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["[]", "42", '{"dlm_tokenizer": "bpe"}'])
def test_load_malformed_json_raises_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        Tokenizer.load(path)


def test_bpe_without_specials_is_refused():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    with pytest.raises(ValueError, match="specials"):
        BPETokenizer(HFTokenizer(models.BPE()))


# ----- build_tokenizer --------------------------------------------------------------------------------------

def test_build_tokenizer_byte():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)


def test_build_tokenizer_bpe_with_vocab():
    tok = build_tokenizer("bpe:280", train_texts=_corpus(100))
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 280


@pytest.mark.parametrize("spec", ["nope", "", "sentencepiece"])
def test_build_tokenizer_unknown_raises(spec):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer(spec)


def test_build_tokenizer_bpe_errors():
    with pytest.raises(ValueError, match="training text"):
        build_tokenizer("bpe:300")
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        build_tokenizer("bpe:many", train_texts=["x"])
