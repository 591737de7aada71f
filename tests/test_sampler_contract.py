"""One contract over every registered sampler (as diffusers tests its schedulers): the hooks the loops use are
declared on the base class, every sampler has them with the declared types, and `step` has one signature."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import torch

from dlm.config import ConfigError, GenerationConfig, SamplerOptions
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


# ----- each sampler's own options (Sampler.Options), declared beside it ---------------------------------------------

SAMPLING = Path(__file__).resolve().parents[1] / "src" / "dlm" / "sampling"


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_declares_its_options(name):
    cls = SAMPLERS.get(name)
    assert cls.name == name  # set by the registry
    assert dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, SamplerOptions), name
    common = set(GenerationConfig.common_names())
    assert not common & {f.name for f in dataclasses.fields(cls.Options)}, name  # an option is common or its own
    sampler = SAMPLERS.build(name, mask_id=5, config=GenerationConfig(), eos_id=3, pad_id=4)
    assert type(sampler.options) is cls.Options and sampler.config.sampler == name


def test_options_of_the_same_name_agree_across_samplers():
    seen: dict[str, tuple] = {}
    for name in SAMPLERS.names():
        opts = SAMPLERS.get(name).Options
        hints = typing.get_type_hints(opts)
        for f in dataclasses.fields(opts):
            key = (hints[f.name], f.default)
            assert seen.setdefault(f.name, key) == key, (name, f.name, key, seen[f.name])
    assert {"threshold", "factor", "eps", "alg_temp", "sub_block", "ar_first_token"} <= set(seen)


def _reads(path: Path, attr: str) -> set[str]:
    """Names read as self.<attr>.<name> in a file."""
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == attr and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}


@pytest.mark.parametrize("path", sorted(SAMPLING.glob("*.py")), ids=lambda p: p.name)
def test_a_sampler_reads_common_fields_from_config_and_its_own_from_options(path):
    common = {*GenerationConfig.common_names(), "options"}  # the base hands self.config.options to self.options
    assert _reads(path, "config") <= common, (path.name, _reads(path, "config") - common)
    own = [SAMPLERS.get(n).Options for n in SAMPLERS.names() if inspect.getfile(SAMPLERS.get(n)) == str(path)]
    if own:  # every option a sampler file reads is declared by the samplers it defines
        declared = {f.name for o in own for f in dataclasses.fields(o)}
        assert _reads(path, "options") <= declared, (path.name, _reads(path, "options") - declared)


def test_flat_options_round_trip_and_follow_the_sampler():
    cfg = GenerationConfig(sampler="block", threshold=0.9, sub_block=4, max_new_tokens=32)
    assert cfg.options.threshold == 0.9 and cfg.options.sub_block == 4
    flat = cfg.to_dict()
    assert "options" not in flat and flat["threshold"] == 0.9  # saved flat, as generation_config.json always was
    assert GenerationConfig.from_dict(flat) == cfg
    fast = cfg.replace(sampler="fast_dllm")  # threshold is read by both: kept; sub_block is block's own: dropped
    assert fast.options.threshold == 0.9 and not hasattr(fast.options, "sub_block")
    assert cfg.replace(sampler="llada").options == SamplerOptions()
    # A config saved when GenerationConfig was one union lists every option at its default: it loads.
    union = {**GenerationConfig().to_dict(), "eps": 1e-3, "alg_temp": None, "threshold": None, "factor": None,
             "sub_block": 0, "ar_first_token": False}
    assert GenerationConfig.from_dict(union) == GenerationConfig()


def test_an_option_the_sampler_does_not_read_is_refused_by_name():
    with pytest.raises(ConfigError, match="threshold is an option of the block and fast_dllm samplers, not of 'llada'"):
        GenerationConfig(threshold=0.9)
    with pytest.raises(ConfigError, match="alg_temp is an option of the dream sampler"):
        GenerationConfig(sampler="mdlm").replace(alg_temp=0.5)
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        GenerationConfig(sampler="block", thresold=0.9)
    with pytest.raises(ConfigError, match="threshold must be in"):
        GenerationConfig(sampler="block", threshold=1.5).validate()


def test_cli_flags_are_generated_from_the_options(capsys):
    from dlm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "hi", "--sampler", "block", "--threshold", "0.9", "--sub-block", "4"])
    assert (args.threshold, args.sub_block) == (0.9, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threshold FLOAT block, fast_dllm samplers only" in out and "--alg-temp FLOAT dream sampler only" in out
