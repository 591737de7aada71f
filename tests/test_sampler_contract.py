"""One contract over every registered sampler (as diffusers tests its schedulers): the hooks the loops use are
declared on the base class, every sampler has them with the declared types, and `step` has one signature."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from dlm.config import GenerationConfig
from dlm.sampling import SAMPLERS
from dlm.sampling.sampler import Sampler, SamplerOutput

FLAGS = ("fixed_plan", "variable_steps", "windowed", "reuse_logits_when_unchanged", "applies_top_k_top_p")
HOOKS = ("set_timesteps", "step", "begin", "pending", "skip_step", "use_process")
STEP_PARAMS = ["self", "logits", "xt", "lo", "hi", "generator", "offset"]


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_implements_the_declared_interface(name):
    cls = SAMPLERS.get(name)
    assert issubclass(cls, Sampler)
    assert list(inspect.signature(cls.step).parameters) == STEP_PARAMS, name
    for hook in HOOKS:
        assert callable(getattr(cls, hook)), (name, hook)
    sampler = SAMPLERS.build(name, mask_id=5, config=GenerationConfig(), eos_id=3, pad_id=4)
    for flag in FLAGS:
        assert isinstance(getattr(sampler, flag), bool), (name, flag)
    sampler.set_timesteps(4, torch.ones(1, 8, dtype=torch.bool))
    t = sampler.model_time
    assert t is None or isinstance(t, float), (name, t)


@pytest.mark.parametrize("name", [n for n in SAMPLERS.names() if not n.startswith(("sedd", "d3pm"))])
def test_one_step_returns_a_sampler_output(name):
    V, mask = 10, 9
    sampler = SAMPLERS.build(name, mask_id=mask, config=GenerationConfig(), eos_id=3, pad_id=4)
    xt = torch.tensor([[1, 2, mask, mask, mask, mask]])
    sampler.set_timesteps(4, xt[:, 2:] == mask)
    x = sampler.begin(xt, slice(2, 6), None)
    assert sampler.pending(x, slice(2, 6))
    out = sampler.step(torch.randn(1, 6, V, generator=torch.Generator().manual_seed(0)), x, 2, 6, None)
    assert isinstance(out, SamplerOutput) and out.xt.shape == xt.shape
    assert torch.equal(out.xt[:, :2], xt[:, :2])  # the prompt never changes


def test_the_loop_and_the_pipeline_probe_no_sampler():
    """No getattr / hasattr on a sampler in the loops or the pipeline: the contract is declared, not probed."""
    src = Path(__file__).resolve().parents[1] / "src" / "dlm"
    for rel in ("sampling/generate.py", "sampling/cache.py", "pipeline.py"):
        tree = ast.parse((src / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                                                                                                  "hasattr"):
                target = ast.unparse(node.args[0])
                assert "sampler" not in target.lower(), f"{rel}:{node.lineno} probes {target}"
