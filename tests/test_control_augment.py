"""Augmentation: each variant re-masks exactly floor(noise * L) tokens (its own draw) and changes nothing else, n
variants per text, deterministic given a seed, faithfulness >= 1 - noise; the metrics against hand-computed
values; `dlm augment` JSONL in and out with one-line errors. Random networks: the guarantees hold for any model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from control_helpers import saved_model_dir, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlm.control.augment as augment_mod
from dlm.cli import main
from dlm.control.augment import augment, bleu, distinct_n, faithfulness, n_remasked, remask, self_bleu
from dlm.sampling import SamplingError
from dlm.tokenizer import ByteTokenizer

MASK = ByteTokenizer().mask_id
ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=60)


@pytest.fixture(scope="module")
def lm():
    return tiny(max_len=128)


@given(st.lists(st.integers(0, 255), min_size=1, max_size=80), st.floats(0.01, 1.0), st.integers(1, 5),
       st.integers(0, 2 ** 31))
@settings(max_examples=100, deadline=None)
def test_remask_masks_exactly_its_share_per_row(ids, noise, n, seed):
    x = torch.tensor(ids)
    rows = remask(x, noise, n, MASK, torch.Generator().manual_seed(seed))
    k = n_remasked(len(ids), noise)
    assert rows.shape == (n, len(ids)) and k == max(1, math.floor(noise * len(ids) + 1e-9))
    assert ((rows == MASK).sum(1) == k).all()
    assert torch.equal(rows[rows != MASK], x.repeat(n, 1)[rows != MASK])
    assert torch.equal(rows, remask(x, noise, n, MASK, torch.Generator().manual_seed(seed)))


@given(st.lists(ASCII, min_size=1, max_size=3), st.sampled_from([0.1, 0.3, 0.5, 1.0]), st.integers(1, 3),
       st.integers(0, 100), st.sampled_from([0.0, 0.8]))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_only_remasked_tokens_change(lm, texts, noise, n, seed, temperature):
    canvases = []  # what augment hands to fill_canvas: the re-masked rows

    def spy(lm, canvas, **kw):
        canvases.append(canvas.clone())
        return real_fill(lm, canvas, **kw)

    real_fill = augment_mod.fill_canvas
    augment_mod.fill_canvas = spy
    try:
        out = augment(lm, texts, noise=noise, n=n, seed=seed, temperature=temperature)
    finally:
        augment_mod.fill_canvas = real_fill
    assert [len(v) for v in out] == [n] * len(texts)
    for text, variants, canvas in zip(texts, out, canvases, strict=True):
        source = torch.tensor(list(text.encode()))
        masked = canvas == MASK  # (n, L)
        assert (masked.sum(1) == n_remasked(len(source), noise)).all()
        for variant, m in zip(variants, masked, strict=True):
            v = torch.tensor(list(variant.encode()))
            assert v.shape == source.shape  # one ASCII token for each: no [PAD], [EOS] or lone byte written
            assert torch.equal(v[~m], source[~m])
            if noise * len(source) >= 1:
                assert faithfulness(text, variant) >= 1 - noise - 1e-9


def test_seed_determinism_and_different_masks(lm):
    text = ["ROMEO: But soft, what light through yonder window breaks? It is the east."]
    a = augment(lm, text, noise=0.3, n=4, seed=3)
    assert a == augment(lm, text, noise=0.3, n=4, seed=3)
    assert a != augment(lm, text, noise=0.3, n=4, seed=4)
    assert len(set(a[0])) > 1  # the variants differ from one another


@pytest.mark.parametrize("kwargs, message", [
    ({"noise": 0.0}, "noise must be in (0, 1]"), ({"noise": 1.5}, "noise must be in (0, 1]"),
    ({"n": 0}, "n must be >= 1"), ({"texts": "a string"}, "list of strings"),
    ({"texts": ["ok", ""]}, "text 1 is empty"), ({"texts": ["x" * 129]}, "text 0 has 129 tokens but the model's "
                                                                         "context is 128"),
])
def test_bad_input_fails_before_any_model_call(lm, kwargs, message):
    kwargs = {"texts": ["fine"], **kwargs}
    with pytest.raises(SamplingError) as e:
        augment(lm, **kwargs)
    assert message in str(e.value)


# ----- metrics ------------------------------------------------------------------------------------------------------
def test_distinct_n():
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4  # (a b) (b c) (a b) (b d)
    assert distinct_n(["a b a b"], 1) == 2 / 4 and distinct_n(["a"], 2) == 0.0


def test_bleu_and_self_bleu():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # clipped precisions 5/6, then add-one smoothed 4/6, 3/5, 2/4; equal lengths: no brevity penalty
    assert bleu(hyp, [ref]) == pytest.approx((5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert bleu("the cat", [ref]) == pytest.approx(math.exp(1 - 6 / 2) * (1 * 2 / 2 * 1 / 1 * 1 / 1) ** 0.25)
    assert bleu(hyp, [hyp]) == pytest.approx(1.0) and bleu("x y", ["a b"]) == 0.0
    assert self_bleu([hyp] * 4) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    with pytest.raises(ValueError):
        self_bleu([hyp])


def test_faithfulness():
    assert faithfulness("abc", "abc") == 1.0 and faithfulness("abc", "abd") == pytest.approx(2 / 3)
    assert faithfulness("abcd", "ab") == 0.5 and faithfulness("", "") == 1.0
    assert faithfulness("héllo", "hello", ByteTokenizer()) == pytest.approx(2 / 6)  # é is 2 bytes: h, l line up


# ----- dlm augment --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, lm):
    return saved_model_dir(tmp_path_factory, lm, "augment")


def test_cli_augment_round_trip_and_errors(model_dir, tmp_path, capsys):
    texts = ["To be, or not to be, that is the question.", "All the world's a stage."]
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": texts[0], "id": 7}) + "\n\n" +
                                       json.dumps({"text": texts[1]}) + "\n")
    main(["augment", str(tmp_path / "in.jsonl"), "--noise", "0.5", "-n", "3", "--model", str(model_dir)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["source"], r["variant"]) for r in rows] == [(i, k) for i in range(2) for k in range(3)]
    for r in rows:
        assert faithfulness(texts[r["source"]], r["text"]) >= 0.5 - 1e-9
    for content, message in [('{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
                             ('{"text": "ok"}\n\n{"text": oops}\n', "line 3: not JSON"),
                             ('{"title": "x"}\n', 'line 1: expected a JSON object with a string "text" field')]:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(SystemExit) as e:
            main(["augment", str(tmp_path / "bad.jsonl"), "--model", str(model_dir)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("dlm: error: ") and message in err and err.count("\n") == 1
