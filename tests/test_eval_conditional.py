"""The conditional log-likelihood (dlm/eval/conditional.py): unbiased for an exact denoiser of an enumerable toy
distribution, exact and chain-rule consistent for AR, and it prefers a real continuation on the shipped models."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from toy_diffusion import MASK, V, toy_distribution

from dlm.eval.conditional import answer_is_greedy, conditional_loglik, stratified_counts


class ExactDenoiser(torch.nn.Module):
    """xt (B, L) -> log p0(x_j = v | the visible tokens of xt) (B, L, V): the true conditionals of the toy p0."""

    def __init__(self, S: torch.Tensor, p0: torch.Tensor) -> None:
        super().__init__()
        self.S, self.p0 = S, p0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # elbo_bits reads the device off a parameter

    def forward(self, xt: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        visible = xt != MASK  # (B, L)
        agrees = ((self.S[None] == xt[:, None]) | ~visible[:, None]).all(-1)  # (B, M) sequences consistent with xt
        w = agrees * self.p0[None]  # (B, M)
        onehot = torch.nn.functional.one_hot(self.S, V).double()  # (M, L, V)
        marg = torch.einsum("bm,mlv->blv", w, onehot)  # (B, L, V)
        return (marg / marg.sum(-1, keepdim=True)).clamp_min(1e-300).log()


def toy_lm(L: int = 4, seed: int = 0):
    S, p0 = toy_distribution(L, seed)
    tok = SimpleNamespace(mask_id=MASK, bos_id=None)
    lm = SimpleNamespace(model=ExactDenoiser(S, p0), tokenizer=tok, max_len=L, is_causal=False, device="cpu",
                         config=SimpleNamespace(process=SimpleNamespace(process="masked")))
    return lm, S, p0


def test_stratified_counts_cover_every_count_equally():
    c = stratified_counts(12, 4, torch.Generator().manual_seed(3))
    assert sorted(c.tolist()) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_mc_mean_matches_the_exact_conditional_of_an_enumerable_toy():
    """For the exact denoiser the bound is tight: E[estimate] = -log p(answer | prompt), computed by enumeration."""
    lm, S, p0 = toy_lm()
    x = S[int(p0.argmin())]  # an unlikely sequence: the conditionals are far from 1
    prompt, answer = x[:1].tolist(), x[1:].tolist()
    same_prompt = S[:, 0] == x[0]
    exact = float(torch.log(p0[(S == x).all(1)].sum() / p0[same_prompt].sum()))
    ll = conditional_loglik(lm, prompt, answer, n_samples=3000, seed=0, batch_size=1000)
    assert ll.stderr < 0.05
    assert abs(ll.nats - exact) < 4 * ll.stderr, (ll, exact)


def test_heldout_elbo_mean_matches_the_exact_nll_of_an_enumerable_toy():
    """dlm eval's estimator (elbo_bits, stratified over windows): for the exact denoiser its mean is -log p0(x)."""
    from dlm.eval.elbo import elbo_bits

    lm, S, p0 = toy_lm()
    x = S[int(p0.argmin())]
    r = elbo_bits(lm.model, x[None].repeat(2000, 1), mask_id=MASK, batch_size=500, seed=0)
    exact = -float(torch.log(p0[(S == x).all(1)]).sum())
    stderr = float(r.nats_per_window.std()) / 2000 ** 0.5
    assert abs(float(r.nats_per_window.mean()) - exact) < 4 * stderr, (float(r.nats_per_window.mean()), exact)


def test_an_answer_in_a_gap_matches_its_exact_conditional():
    """With known text after the answer: E[estimate] = -log p(x1 x2 | x0, x3)."""
    lm, S, p0 = toy_lm()
    x = S[int(p0.argmin())]
    given = (S[:, 0] == x[0]) & (S[:, 3] == x[3])
    exact = float(torch.log(p0[(S == x).all(1)].sum() / p0[given].sum()))
    ll = conditional_loglik(lm, x[:1].tolist(), x[1:3].tolist(), n_samples=2000, batch_size=1000,
                            suffix_ids=x[3:].tolist())
    assert abs(ll.nats - exact) < 4 * ll.stderr, (ll, exact)


def test_empty_answer_and_bad_sample_count():
    lm, _, _ = toy_lm()
    assert conditional_loglik(lm, [0], [], n_samples=4) == (0.0, 0.0)
    with pytest.raises(ValueError, match="n_samples"):
        conditional_loglik(lm, [0], [2], n_samples=0)
    with pytest.raises(ValueError, match="context"):
        conditional_loglik(lm, [], [2] * 5, n_samples=2)


@pytest.fixture(scope="module")
def shipped():
    from dlm.pipeline import DiffusionLM

    return DiffusionLM.from_pretrained("default"), DiffusionLM.from_pretrained("shakespeare-ar")


PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
ANSWER = "It is the east, and Juliet is the sun."


def shuffled(text: str) -> str:
    words = text.split()
    random.Random(0).shuffle(words)
    return " ".join(words)


def test_ar_is_exact_and_obeys_the_chain_rule(shipped):
    _, ar = shipped
    enc = ar.tokenizer.encode
    whole = conditional_loglik(ar, [], enc(PROMPT + ANSWER))
    parts = conditional_loglik(ar, [], enc(PROMPT)).nats + conditional_loglik(ar, enc(PROMPT), enc(ANSWER)).nats
    assert whole.stderr == 0.0
    with pytest.raises(ValueError, match="cannot condition on text after"):
        conditional_loglik(ar, enc(PROMPT), enc(ANSWER), suffix_ids=enc("\n"))
    assert whole.nats == pytest.approx(parts, abs=1e-3)
    # the greedy check agrees with a greedy continuation
    ids = enc(PROMPT)
    greedy = []
    for _ in range(6):
        seq = torch.tensor([[ar.tokenizer.bos_id, *ids, *greedy]])
        greedy.append(int(ar.model(seq, None)[0, -1].argmax()))
    assert answer_is_greedy(ar, ids, greedy)
    assert not answer_is_greedy(ar, ids, greedy[:-1] + [(greedy[-1] + 1) % 256])


@pytest.mark.parametrize("which", [0, 1])
def test_a_true_continuation_ranks_above_its_shuffled_words(shipped, which):
    lm = shipped[which]
    enc = lm.tokenizer.encode
    true = conditional_loglik(lm, enc(PROMPT), enc(ANSWER), n_samples=32, seed=0)
    fake = conditional_loglik(lm, enc(PROMPT), enc(shuffled(ANSWER)), n_samples=32, seed=0)
    assert true.nats > fake.nats + 5.0, (true, fake)


def test_dlm_greedy_check_follows_its_own_greedy_fill(shipped):
    lm, _ = shipped
    ids = lm.tokenizer.encode(PROMPT)
    # plain greedy: no repetition penalty / top-p from the model's own sampling defaults
    out = lm.generate(torch.tensor([ids]), max_new_tokens=5, steps=5, block_length=5, temperature=0.0,
                      repetition_penalty=1.0, top_p=None)
    assert answer_is_greedy(lm, ids, out[0, len(ids):].tolist())


def test_cli_eval_answer(shipped, capsys):
    import json

    from dlm.cli import main

    main(["eval", "--model", "shakespeare-ar", "--prompt", PROMPT, "--answer", ANSWER, "--json"])
    out = json.loads(capsys.readouterr().out)
    enc = shipped[1].tokenizer.encode
    assert out["exact"] and out["loglik_nats"] == pytest.approx(conditional_loglik(shipped[1], enc(PROMPT),
                                                                                   enc(ANSWER)).nats)
    with pytest.raises(SystemExit):
        main(["eval", "--model", "shakespeare-ar"])
    assert "give --data" in capsys.readouterr().err
