"""One definition of time: the t a time-conditioned network sees for a canvas is the same in training, sampling
and both likelihood estimators, for every schedule (dlm.process.ForwardProcess.model_time)."""

from __future__ import annotations

import pytest
import torch

from dlm.config import CheckpointConfig, ModelConfig, ProcessConfig
from dlm.losses import LOSSES
from dlm.models import build_model
from dlm.pipeline import DiffusionLM
from dlm.process import build_process
from dlm.schedules import SCHEDULES
from dlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("name", sorted(SCHEDULES.names()))
def test_t_for_move_chance_inverts_move_chance(name):
    s = SCHEDULES.get(name)(eps=1e-3)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    back = s.t_for_move_chance(s.move_chance(t))
    # float64 round trip: the closed forms and the 52-step bisection are both exact to ~1e-15 in p; in t that is
    # 1e-15 / (dp/dt), and dp/dt >= 1e-3 on this grid for every schedule.
    torch.testing.assert_close(back, t, rtol=0, atol=1e-10)


def _process(schedule: str):
    return build_process(ProcessConfig(process="masked", schedule=schedule), TOK)


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_training_and_sampling_give_the_network_the_same_t(schedule):
    """Training draws t and masks move_chance(t) of the tokens; a canvas with that fraction of masks, seen at
    sampling or scoring time, gets the same t back (up to the rounding of the fraction to whole tokens)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dit", vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=4096,
                      time_dim=16)
    model = build_model(cfg).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (xt, t) of every forward
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    proc = _process(schedule)
    L = 4096
    x0 = torch.randint(0, 256, (8, L))
    loss = LOSSES.get("masked_elbo")(antithetic=True)
    with torch.no_grad():
        loss(model, x0, proc, generator=torch.Generator().manual_seed(1))
    (xt, t_train), = seen
    lm = DiffusionLM(model, TOK, CheckpointConfig(model=cfg, process=ProcessConfig(schedule=schedule)))
    lm.logits(xt)
    t_sample = seen[-1][1]
    # The canvas's mask fraction differs from move_chance(t) by the binomial noise of L draws (sd <= 0.5/sqrt(L));
    # mapped to t through the schedule's slope, 5 sd of it bounds the difference.
    s = proc.schedule
    slope = (s.move_chance(t_train.double() + 1e-6) - s.move_chance(t_train.double() - 1e-6)) / 2e-6
    tol = 5 * 0.5 / L ** 0.5 / slope.clamp_min(1e-3)
    assert ((t_sample.double() - t_train.double()).abs() <= tol).all(), (t_sample, t_train, tol)
    # The sampling-time t is exactly the process's definition, and the estimators use the same one.
    torch.testing.assert_close(t_sample, proc.model_time(xt))
    from dlm.eval.conditional import conditional_loglik

    seen.clear()
    conditional_loglik(lm, [65, 66], [67, 68, 69, 70], n_samples=4, seed=0)
    for x, t in seen:
        torch.testing.assert_close(t, proc.model_time(x))
    from dlm.eval.elbo import elbo_bits

    seen.clear()
    elbo_bits(model, x0[:2, :64], TOK.mask_id, n_samples=1, process=proc)
    for x, t in seen:
        torch.testing.assert_close(t, proc.model_time(x))


def test_cosine_time_is_not_the_mask_fraction():
    # The case the old code got wrong: under the cosine schedule half the tokens masked is t = 2/3, not 1/2.
    proc = _process("cosine")
    xt = torch.tensor([[TOK.mask_id] * 50 + [65] * 50])
    t = float(proc.model_time(xt))
    assert abs(float(proc.schedule.move_chance(torch.tensor([t]))) - 0.5) < 1e-6 and abs(t - 2 / 3) < 1e-3


def test_padding_is_not_counted_in_the_fraction():
    proc = _process("linear")
    xt = torch.tensor([[TOK.pad_id] * 6 + [TOK.mask_id] * 2 + [65] * 2])
    real = torch.tensor([[0] * 6 + [1] * 4])
    torch.testing.assert_close(proc.model_time(xt, real), proc.schedule.t_for_move_chance(torch.tensor([0.5])).float())
