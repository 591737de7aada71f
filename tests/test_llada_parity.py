"""Our LLaDA sampler equals the reference algorithm token for token (temperature 0, default options).

The reference loop below is written plainly from ML-GSAI/LLaDA `generate.py` (its behaviour, in our words): full
forward, argmax, float64 softmax confidence of every position, -inf past the block end and at unmasked
positions, top-k per row with LLaDA's even split of each block's masks over its steps.
"""

from __future__ import annotations

import pytest
import torch

from dlm.config import GenerationConfig, ModelConfig
from dlm.models import build_model
from dlm.sampling import SAMPLERS, classifier_free_guidance, denoise

MASK = 60


def reference_generate(model_fn, prompt, steps, gen_length, block_length, cfg_scale=0.0):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), MASK, dtype=torch.long)
    x[:, :P] = prompt
    prompt_index = x != MASK
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        block_masks = (x[:, lo:hi] == MASK).sum(1, keepdim=True)
        plan = torch.zeros(B, per_block, dtype=torch.long) + block_masks // per_block
        for j in range(B):
            plan[j, : int(block_masks[j] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = MASK
                both = model_fn(torch.cat([x, un]))
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model_fn(x)
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), -1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                k = int(plan[j, i])
                if k:
                    transfer[j, torch.topk(conf[j], k).indices] = True
            x[transfer] = x0[transfer]
    return x


@pytest.fixture(scope="module")
def model_fn():
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_len=128)).eval()
    bias = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)) * 3  # distinct confidences

    def fn(x):
        with torch.no_grad():
            logits = net(x).float() * 10 + bias[: x.shape[1]]
        logits[..., MASK] = -1e9  # like a trained LLaDA, the model never predicts [MASK]
        return logits

    return fn


@pytest.mark.parametrize("steps, gen, block", [(32, 32, 32), (16, 32, 8), (12, 48, 16), (64, 64, 16), (5, 20, 20)])
def test_tokens_equal_the_reference(model_fn, steps, gen, block):
    prompt = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(steps))
    ref = reference_generate(model_fn, prompt, steps, gen, block)
    x = torch.full((3, 7 + gen), MASK, dtype=torch.long)
    x[:, :7] = prompt
    sampler = SAMPLERS.build("llada", mask_id=MASK, config=GenerationConfig(steps=steps, block_length=block))
    ours = denoise(model_fn, x, 7, steps, block, sampler)
    assert torch.equal(ours, ref)


def test_guidance_equals_the_reference(model_fn):
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = reference_generate(model_fn, prompt, 16, 16, 8, cfg_scale=2.0)
    x = torch.full((2, 21), MASK, dtype=torch.long)
    x[:, :5] = prompt
    prompt_mask = x != MASK
    sampler = SAMPLERS.build("llada", mask_id=MASK, config=GenerationConfig())
    guided = classifier_free_guidance(model_fn, prompt_mask, 2.0, MASK)
    assert torch.equal(denoise(guided, x, 5, 16, 8, sampler), ref)
