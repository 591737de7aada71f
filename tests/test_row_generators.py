"""One random generator per row (dlm.sampling.noise): a seeded row's sample does not depend on its batch.

For every registered sampler, at temperature > 0 (and with random remasking where the sampler ranks): a row
decoded alone equals the same row decoded beside three other prompts of other lengths (left-padded) with other
seeds; row i of a seeded call is the one-row call seeded row_seed(seed, i); n samples of one seed differ from each other
and repeat across calls; unseeded rows differ. Tiny random networks (a random network's predictions are spread,
so samples of different noise differ).
"""

from __future__ import annotations

import pytest
import torch

from dlm.config import CheckpointConfig, GenerationConfig, ModelConfig
from dlm.models import build_model
from dlm.pipeline import DiffusionLM
from dlm.sampling import SAMPLERS, SamplingError
from dlm.sampling.noise import RowGenerators, for_items, row_seed, subset, uniform
from dlm.tokenizer import ByteTokenizer
from dlm.train import generation_defaults, process_config

PROMPTS = ["ROMEO:", "JULIET: O Romeo", "a", "To be, or not"]  # different lengths: the batch is left-padded
NEW = 8

# sampler -> (process, arch, extra options): every registered sampler, its randomness switched on.
CASES = {
    "llada": ("masked", "llada", {"remasking": "random"}),
    "llada-confidence": ("masked", "llada", {"sampler": "llada", "block_length": 4}),
    "dream": ("masked", "llada", {"remasking": "entropy", "alg_temp": 0.5, "top_p": 0.9}),
    "dream-origin": ("masked", "llada", {"sampler": "dream", "remasking": "origin"}),
    "mdlm": ("masked", "llada", {"block_length": 4}),
    "mdlm_cache": ("masked", "llada", {}),
    "fast_dllm": ("masked", "llada", {"threshold": 0.05, "remasking": "random", "block_length": 4}),
    "block": ("bd3lm", "llada", {"remasking": "random", "threshold": 0.05}),
    "sedd_euler": ("sedd-absorbing", "dit", {}),
    "sedd_analytic": ("sedd-uniform", "dit", {}),
    "d3pm": ("d3pm-uniform", "dit", {}),
    "d3pm-absorbing": ("d3pm-absorbing", "dit", {"sampler": "d3pm"}),
}


def _lm(case: str) -> DiffusionLM:
    process, arch, extra = CASES[case]
    pcfg = process_config(process, **({"block_size": 4} if process == "bd3lm" else {}),
                          **({"timesteps": 20} if process.startswith("d3pm") else {}))
    sampler = extra.get("sampler", case)
    options = {"block_length": 0, **{k: v for k, v in extra.items() if k != "sampler"}}
    gen = generation_defaults(pcfg).replace(sampler=sampler, temperature=1.0, max_new_tokens=NEW, steps=NEW,
                                            **options)
    cfg = ModelConfig.preset("tiny", arch=arch, max_len=64)
    torch.manual_seed(0)
    return DiffusionLM(build_model(cfg).eval(), ByteTokenizer(), CheckpointConfig(model=cfg, process=pcfg,
                                                                                 sampling=gen))


@pytest.fixture(scope="module", params=sorted(CASES))
def lm(request) -> DiffusionLM:
    return _lm(request.param)


def test_every_registered_sampler_is_covered():
    covered = {extra.get("sampler", name) for name, (_, _, extra) in CASES.items()}
    assert set(SAMPLERS.names()) <= covered


def test_a_seeded_row_is_the_same_alone_and_in_a_batch(lm):
    alone = lm.generate(PROMPTS[0], seed=5)
    batched = lm.generate(PROMPTS, generator=RowGenerators.from_seeds([5, 11, 12, 13]))
    assert batched[0] == alone
    assert batched[2] == lm.generate(PROMPTS[2], seed=12)  # a row in the middle, shorter than its neighbours
    ids = lm.generate(PROMPTS, generator=RowGenerators.from_seeds([99, 11, 12, 13]))
    assert ids[1:] == batched[1:]  # changing row 0's seed leaves the other rows' samples as they were
    assert lm.generate(PROMPTS, seed=5)[1] == lm.generate(PROMPTS[1], seed=row_seed(5, 1))  # row i: row_seed(seed, i)


def test_n_samples_of_one_seed_differ_and_repeat(lm):
    samples = lm.generate(PROMPTS[0], seed=3, num_samples=4)
    assert len(samples) == 4 and len(set(samples)) == 4  # diverse: different noise in every row
    assert lm.generate(PROMPTS[0], seed=3, num_samples=4) == samples  # reproducible
    assert samples[1] == lm.generate(PROMPTS[0], seed=row_seed(3, 1))  # sample j: the one-row call row_seed(seed, j)
    assert lm.generate(PROMPTS[:2], seed=3, num_samples=4)[0] == samples  # another prompt beside it changes nothing


def test_unseeded_rows_differ(lm):
    a = lm.generate(PROMPTS[0], num_samples=4)
    b = lm.generate(PROMPTS[0], num_samples=4)
    assert len(set(a)) == 4 and a != b


def test_the_row_noise_helpers():
    g = RowGenerators.seeded(7, 3)
    counts = torch.tensor([2, 0, 3])
    u = uniform(for_items(g, counts), (5, 4))  # row 0 owns items 0-1, row 2 items 2-4
    assert torch.equal(u[:2], torch.rand(2, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    row2 = torch.Generator().manual_seed(row_seed(7, 2))
    assert torch.equal(u[2:], torch.rand(3, 4, generator=row2, dtype=torch.float64))
    kept = subset(g, torch.tensor([False, True, True]))
    assert len(kept) == 2 and kept.generators[1] is g.generators[2]  # the stream carries on with its row
    single = torch.Generator().manual_seed(0)  # a plain generator still works: the whole draw from one stream
    assert for_items(single, counts) is single and uniform(single, (2, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="counts"):
        uniform(g, (5, 4))
    with pytest.raises(ValueError, match="split"):
        uniform(for_items(g, counts), (7,))


def test_a_wrong_number_of_generators_is_refused():
    lm = _lm("llada")
    with pytest.raises(SamplingError, match="one per row"):
        lm.generate(PROMPTS, generator=RowGenerators.seeded(0, 3))
    with pytest.raises(SamplingError, match="generator must be"):
        lm.generate(PROMPTS[0], generator=5)
    gens = [torch.Generator().manual_seed(s) for s in (5, 1)]  # diffusers' convention: a list, one per row
    assert lm.generate(PROMPTS[:2], generator=gens)[0] == lm.generate(PROMPTS[0], seed=5)


def test_temperature_zero_is_unchanged_by_the_rows():
    lm = _lm("llada-confidence")
    greedy = GenerationConfig(temperature=0.0, sampler="llada", max_new_tokens=NEW, steps=NEW, block_length=4)
    assert lm.generate(PROMPTS, config=greedy, seed=0) == lm.generate(PROMPTS, config=greedy, seed=123)


def test_the_autoregressive_baseline_draws_per_row_too():
    cfg = ModelConfig.preset("tiny", arch="ar", max_len=64)
    torch.manual_seed(0)
    lm = DiffusionLM(build_model(cfg).eval(), ByteTokenizer(), CheckpointConfig(
        model=cfg, process=process_config("masked", loss="ar"), sampling=GenerationConfig(temperature=1.0,
                                                                                          max_new_tokens=NEW)))
    assert lm.is_causal
    batched = lm.generate(PROMPTS, generator=RowGenerators.from_seeds([5, 11, 12, 13]))
    assert batched[0] == lm.generate(PROMPTS[0], seed=5) and batched[2] == lm.generate(PROMPTS[2], seed=12)
    assert len(set(lm.generate(PROMPTS[0], seed=3, num_samples=4))) == 4


def test_row_seeds_of_nearby_seeds_do_not_overlap():
    """seed + i would give seeds 0 and 1 at n = 4 three shared rows; row_seed gives none for seeds 0..99 at n = 8."""
    seeds = [row_seed(s, i) for s in range(100) for i in range(8)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**63 for x in seeds)
    assert [row_seed(s, 0) for s in range(5)] == list(range(5))  # row 0 is the seed: one-row calls unchanged


def test_nearby_seeds_give_different_samples(lm):
    a = lm.generate(PROMPTS[0], seed=3, num_samples=4)
    b = lm.generate(PROMPTS[0], seed=4, num_samples=4)
    assert a[0] != b[0] and not set(a[1:]) & set(b)  # seed 3's rows 1..3 are none of seed 4's
