"""The calls the Italian guide to DLMs shows its readers (the seed of this project), pasted verbatim: they run on
any loaded model. A tiny random model with a long context keeps them fast; what they guarantee is checked."""
# ruff: noqa: E501  (the guide's calls are pasted verbatim, long lines and all)

from __future__ import annotations

import ast

import pytest
import torch
from control_helpers import tiny

from dlm.sampling import SamplingError


@pytest.fixture(scope="module")
def dlm_model():
    return tiny(max_len=384)  # the document is clipped to the context: within the guide's max_length of 2000


def test_generate_with_constraints_prints_the_code(dlm_model, capsys):
    generated_code = dlm_model.generate_with_constraints(prompt="Implementa una funzione per pulire e preprocessare dati tabellari",
                                                         constraints={"language": "python", "max_lines": 50, "includes_docstring": True,
                                                                      "function_signature": "def process_data(df: pd.DataFrame) -> pd.DataFrame:"},
                                                         line_tokens=4, docstring_tokens=8, repair_rounds=1)  # (kept fast)
    print(generated_code)
    out = capsys.readouterr().out
    assert out.startswith("def process_data(df: pd.DataFrame) -> pd.DataFrame:\n")  # the code, not a repr
    assert isinstance(generated_code, str) and out == generated_code + "\n"
    ast.parse(generated_code)
    assert all(generated_code.checks.values()) and generated_code.code == str(generated_code)


def test_generate_with_markdown_constraints_writes_those_sections(dlm_model):
    model, prompt = dlm_model, "Quarterly report on the sales of the northern region."
    report = model.generate(prompt, constraints={"format": "markdown", "sections": ["executive_summary", "analysis",
                            "recommendations"], "max_length": 2000}, num_steps=200)
    headings = [line for line in report.splitlines() if line.startswith("#")]
    assert headings == ["## Executive Summary", "## Analysis", "## Recommendations"]
    assert len(report) <= 2000  # max_length counts tokens; a byte token decodes to at most one character


def test_markdown_length_is_kept(dlm_model):
    report = dlm_model.generate("Notes.", constraints={"format": "markdown", "sections": ["a", "b"], "max_length": 60},
                                seed=0)
    assert len(report) <= 60


def test_hugging_face_style_call_on_token_ids(dlm_model):
    model, tokenizer, prompt = dlm_model, dlm_model.tokenizer, "def fib(n):"
    output = model.generate(tokenizer.encode(prompt, return_tensors="pt"), max_length=64, num_sampling_steps=16)
    assert isinstance(output, torch.Tensor) and output.shape == (1, 64)
    assert output[0, :len(prompt)].tolist() == tokenizer.encode(prompt)
    ids = model.generate(tokenizer.encode(prompt), max_new_tokens=8, steps=8)  # a plain list[int] -> list[int]
    assert isinstance(ids, list) and ids[:len(prompt)] == tokenizer.encode(prompt) and len(ids) == len(prompt) + 8


def test_other_libraries_names_and_did_you_mean(dlm_model):
    a = dlm_model.generate("x", max_new_tokens=8, num_steps=8, seed=0)
    assert a == dlm_model.generate("x", max_new_tokens=8, steps=8, seed=0)
    with pytest.raises(SamplingError, match=r"did you mean 'temperature' for 'temprature'"):
        dlm_model.generate("x", max_new_tokens=8, temprature=0.5)
    with pytest.raises(SamplingError, match="name the same option"):
        dlm_model.generate("x", steps=8, num_steps=8)
    with pytest.raises(SamplingError, match="supported"):
        dlm_model.generate("x", constraints={"format": "yaml"})
