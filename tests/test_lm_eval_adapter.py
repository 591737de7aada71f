"""The lm-evaluation-harness adapter (dlm/eval/lm_eval_adapter.py) on local 5-example tasks (tests/data/lm_eval):
multiple choice (loglikelihood), completion (generate_until) and perplexity (loglikelihood_rolling), offline."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the adapter needs lm-eval-harness: pip install 'dlm[lmeval]'")

TASKS = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_registered_beside_the_builtin_models():
    from lm_eval.api.registry import get_model, model_registry

    from dlm.eval.lm_eval_adapter import DLMEvalLM

    assert get_model("dlm") is DLMEvalLM
    assert "hf" in model_registry  # registering ours did not hide the harness's own models


def test_local_tasks_run_through_simple_evaluate():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dlm.eval.lm_eval_adapter import DLMEvalLM

    tasks = ["dlm_shakespeare_mc", "dlm_shakespeare_gen", "dlm_shakespeare_ppl"]
    model = DLMEvalLM(pretrained="default", mc_num=4)
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)))
    res = out["results"]
    assert res["dlm_shakespeare_mc"]["sample_len"] == 5
    assert res["dlm_shakespeare_mc"]["acc,none"] >= 0.4  # the true ending beats two scrambles of it (chance 1/3)
    assert 0.0 <= res["dlm_shakespeare_gen"]["exact_match,none"] <= 1.0
    enc = model.lm.tokenizer.encode  # max_gen_toks counts tokens (bytes for a byte model, BPE tokens here)
    assert all(len(enc(s["resps"][0][0])) <= 16 and "\n" not in s["resps"][0][0]
               for s in out["samples"]["dlm_shakespeare_gen"])  # at most max_gen_toks tokens, cut at the stop
    assert 1.0 < res["dlm_shakespeare_ppl"]["bits_per_byte,none"] < 8.0


def test_ar_requests_are_exact():
    from lm_eval.api.instance import Instance

    from dlm.eval.conditional import conditional_loglik
    from dlm.eval.lm_eval_adapter import DLMEvalLM

    model = DLMEvalLM(pretrained="shakespeare-ar")
    enc = model.lm.tokenizer.encode

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    (ll, greedy), = model.loglikelihood([req("loglikelihood", ("HAMLET:\nTo be, or not to be, ", "that is"))])
    assert ll == pytest.approx(conditional_loglik(model.lm, enc("HAMLET:\nTo be, or not to be,"), enc(" that is")).nats)
    text = "HAMLET:\nTo be, or not to be, that is the question.\n" * 4  # two chunks of half the context
    rolled, = model.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert model.lm.max_len // 2 < len(enc(text)) < model.lm.max_len
    assert rolled == pytest.approx(conditional_loglik(model.lm, [], enc(text)).nats, abs=1e-3)  # the chain rule
    out, = model.generate_until([req("generate_until", ("HAMLET:\n", {"until": [","], "max_gen_toks": 20}))])
    assert "," not in out and len(out) <= 20
