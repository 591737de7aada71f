"""DiffusionLM end to end on a tiny trained model: generate, infill, logits, and the errors users meet."""

from __future__ import annotations

import pytest
import torch

from dlm.pipeline import DiffusionLM
from dlm.sampling import SamplingError


@pytest.fixture(scope="module")
def lm(trained_tiny):
    return DiffusionLM.from_pretrained(str(trained_tiny))


def test_generate_text_returns_a_continuation(lm):
    out = lm.generate("ROMEO:\n", max_new_tokens=32, steps=16, block_length=16, seed=0)
    assert isinstance(out, str) and len(out) > 0
    assert "[MASK]" not in out
    # greedy decoding is deterministic
    assert out == lm.generate("ROMEO:\n", max_new_tokens=32, steps=16, block_length=16, seed=0)
    # the text is the decoded tail of the ids call: the prompt kept verbatim, exactly 32 new tokens, none special
    tok = lm.tokenizer
    prompt = tok.encode("ROMEO:\n")
    ids = lm.generate(torch.tensor([prompt]), max_new_tokens=32, steps=16, block_length=16, seed=0)
    assert ids.shape == (1, len(prompt) + 32) and ids[0, : len(prompt)].tolist() == prompt
    new = ids[0, len(prompt):].tolist()
    assert not {tok.mask_id, tok.bos_id} & set(new)  # suppress_special bans them
    assert out == lm.decode_new(new)


def test_generate_ids_keeps_the_prompt_and_leaves_no_mask(lm):
    tok = lm.tokenizer
    ids = torch.tensor([tok.encode("HAMLET:\n"), tok.encode("Lady M:\n")])
    out = lm.generate(ids, max_new_tokens=16, steps=8, block_length=8, temperature=0.7, seed=3)
    assert out.shape == (2, ids.shape[1] + 16) and out.dtype == torch.long
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert not (out == tok.mask_id).any()
    again = lm.generate(ids, max_new_tokens=16, steps=8, block_length=8, temperature=0.7, seed=3)
    assert torch.equal(out, again)


def test_logits_shape_and_dtype(lm):
    ids = torch.tensor([lm.tokenizer.encode("to be or not")])
    logits = lm.logits(ids)
    assert logits.shape == (1, ids.shape[1], lm.tokenizer.vocab_size) and logits.dtype == torch.float32


def test_infill_keeps_text_outside_gaps_byte_for_byte(lm):
    text = "To be, or not to be, [MASK] is the question.\nWhether 'tis nobler [MASK:6] to suffer ü"
    out = lm.infill(text, max_span=16, seed=0)
    before, rest = out[: len("To be, or not to be, ")], out[len("To be, or not to be, "):]
    assert before == "To be, or not to be, "
    assert out.endswith(" to suffer ü")
    assert " is the question.\nWhether 'tis nobler " in rest
    assert "[MASK" not in out


def test_fixed_gap_has_exactly_n_tokens(lm):
    prefix, suffix = "KING:\nMy lord, ", " and so farewell.\n"
    tok = lm.tokenizer
    ids, gaps, _ = lm.parse_gaps(prefix + "[MASK:10]" + suffix, max_span=64)
    assert len(gaps) == 1 and gaps[0].length == 10 and gaps[0].fixed
    assert ids.count(tok.mask_id) == 10
    out = lm.infill(prefix + "[MASK:10]" + suffix, seed=0)
    fill = out[len(prefix): len(out) - len(suffix)]
    assert len(tok.encode(fill)) == 10 or "\ufffd" in fill  # 10 bytes (a cut UTF-8 char is replaced)


def test_bad_input_gives_clear_errors(lm):
    with pytest.raises(SamplingError, match="empty"):
        lm.generate("")
    with pytest.raises(SamplingError, match="context"):
        lm.generate("x" * 200, max_new_tokens=64, steps=64, block_length=64)
    assert isinstance(lm.generate("ROMEO:", max_new_tokens=30, steps=30, block_length=16), str)  # last block 14
    events = list(lm.stream("ROMEO:", max_new_tokens=30, steps=30, block_length=16))
    # 16 then 14 masks, 15 steps per block split as LLaDA's plan: 2, 1, ..., 1 | 1, ..., 1, 0 (a step that commits
    # nothing runs no forward pass and shows no event)
    assert [e.block for e in events] == [0] * 15 + [1] * 14
    assert [int(e.output.committed.sum()) for e in events] == [2] + [1] * 28
    assert not (events[-1].output.xt == lm.tokenizer.mask_id).any()
    with pytest.raises(SamplingError, match="multiple of the number of blocks"):
        lm.generate("ROMEO:", max_new_tokens=32, steps=7, block_length=16)
    with pytest.raises(SamplingError, match="no gap"):
        lm.infill("nothing to fill")
    with pytest.raises(ValueError, match="remasking"):
        lm.generate("ROMEO:", max_new_tokens=32, steps=32, remasking="nope")


def test_unknown_model_name(tmp_path):
    from dlm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="unknown model"):
        DiffusionLM.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        DiffusionLM.from_pretrained(str(tmp_path))


def test_batch_of_prompts_of_different_lengths_matches_each_alone(lm):
    prompts = ["ROMEO:\n", "HAMLET:\nTo be, or not to be,", "Ay"]
    batch = lm.generate(prompts, max_new_tokens=16, steps=16, block_length=8, seed=0)
    alone = [lm.generate(p, max_new_tokens=16, steps=16, block_length=8, seed=0) for p in prompts]
    assert batch == alone


def test_ids_with_attention_mask_match_text_batch(lm):
    tok = lm.tokenizer
    a, b = tok.encode("KING:\n"), tok.encode("QUEEN MARGARET:\n")
    ids = torch.full((2, len(b)), tok.pad_id)
    ids[0, len(b) - len(a):] = torch.tensor(a)
    ids[1] = torch.tensor(b)
    am = (ids != tok.pad_id).long()
    out = lm.generate(ids, attention_mask=am, max_new_tokens=8, steps=8, block_length=8)
    texts = lm.generate(["KING:\n", "QUEEN MARGARET:\n"], max_new_tokens=8, steps=8, block_length=8)
    assert [tok.decode(r[len(b):].tolist()) for r in out] == texts


def test_num_samples_gives_diverse_samples_in_one_call(lm):
    outs = lm.generate("ROMEO:\n", max_new_tokens=16, steps=16, block_length=16, temperature=1.0, num_samples=4,
                       seed=0)
    assert isinstance(outs, list) and len(outs) == 4 and len(set(outs)) > 1
    many = lm.generate(["A", "B"], max_new_tokens=8, steps=8, block_length=8, num_samples=2, temperature=1.0, seed=0)
    assert len(many) == 2 and all(len(group) == 2 for group in many)


def test_stream_yields_every_step_and_ends_unmasked(lm):
    events = list(lm.stream("ROMEO:\n", max_new_tokens=16, steps=8, block_length=8, seed=0))
    assert len(events) == 8
    assert all(int(e.output.committed.sum()) == 2 for e in events)  # 16 masks over 8 steps
    final = events[-1].output.xt
    assert not (final == lm.tokenizer.mask_id).any()
    assert lm.tokenizer.decode(final[0, 7:].tolist()) == lm.generate("ROMEO:\n", max_new_tokens=16, steps=8,
                                                                       block_length=8, seed=0)


def test_unknown_option_is_a_clear_error(lm):
    with pytest.raises(SamplingError, match="unknown"):
        lm.generate("ROMEO:", max_new_tokens=8, steps=8, nonsense=3)
    with pytest.raises(SamplingError, match="top_p"):
        lm.generate("ROMEO:", max_new_tokens=8, steps=8, top_p=1.5)


class EosLover(torch.nn.Module):
    """Fixed logits: [EOS] is the top prediction at every position from `eos_from` on, else byte 'a'."""

    causal = False
    needs_time = False

    def __init__(self, vocab: int, eos_id: int, eos_from: int) -> None:
        super().__init__()
        self.vocab, self.eos_id, self.eos_from = vocab, eos_id, eos_from
        self.calls = 0

    def forward(self, x, t=None, attention_mask=None):
        self.calls += 1
        B, L = x.shape
        logits = torch.zeros(B, L, self.vocab)
        logits[..., ord("a")] = 1.0
        logits[:, self.eos_from:, self.eos_id] = 5.0  # very confident EOS
        return logits


def _eos_lm(eos_from: int):
    from dlm.config import CheckpointConfig, ModelConfig
    from dlm.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", max_len=128))
    return DiffusionLM(EosLover(tok.vocab_size, tok.eos_id, eos_from), tok, cfg)


def test_eos_options():
    lm = _eos_lm(eos_from=10)  # prompt of 2 tokens; EOS wins from position 10 on
    kw = dict(max_new_tokens=32, steps=32, block_length=8, seed=0)
    assert lm.generate("xy", **kw) == "a" * 8  # text output is cut at the first [EOS]
    assert lm.generate("xy", ban_eos=True, **kw) == "a" * 32
    # defer_eos: within a block, EOS predictions are committed only after every other one
    short = _eos_lm(eos_from=6)
    eos = short.tokenizer.eos_id
    for defer, expected in ((False, [eos] * 4 + [ord("a")] * 4), (True, [ord("a")] * 4 + [eos] * 4)):
        order = []
        short.generate("xy", defer_eos=defer, max_new_tokens=8, steps=8, block_length=8, seed=0,
                       callback=lambda e, order=order: order.extend(e.output.x0[0][e.output.committed[0]].tolist()))
        assert order == expected
    # stop_at_eos: the row stops after the block holding [EOS]; later blocks need no forward pass
    lm.model.calls = 0
    ids = lm.generate(torch.tensor([[120, 121]]), stop_at_eos=True, **kw)
    assert lm.model.calls == 16  # two blocks of 8 steps, then the row is done
    assert (ids[0, 10:] == lm.tokenizer.eos_id).all()


def test_guidance_and_filters_run_through_the_pipeline(lm):
    prompts = ["ROMEO:\n", "Ay"]  # different lengths: the guided forward doubles the padding mask too
    guided = lm.generate(prompts, max_new_tokens=8, steps=8, block_length=8, cfg_scale=1.5)
    plain = lm.generate(prompts, max_new_tokens=8, steps=8, block_length=8)
    assert len(guided) == 2 and all(isinstance(t, str) for t in guided)
    tok = lm.tokenizer
    prompt = tok.encode("ROMEO:\n")
    ids = lm.generate(torch.tensor([prompt]), max_new_tokens=8, steps=8, block_length=8, cfg_scale=1.5)
    assert ids[0, : len(prompt)].tolist() == prompt and lm.decode_new(ids[0, len(prompt):].tolist()) == guided[0]
    assert guided == [lm.generate(p, max_new_tokens=8, steps=8, block_length=8, cfg_scale=1.5) for p in prompts]
    assert plain == [lm.generate(p, max_new_tokens=8, steps=8, block_length=8) for p in prompts]
    out = lm.generate("ROMEO:\n", max_new_tokens=16, steps=16, block_length=16, temperature=1.0, top_k=1, seed=1)
    assert out == lm.generate("ROMEO:\n", max_new_tokens=16, steps=16, block_length=16, temperature=1.0, top_k=1,
                              seed=2)  # top_k=1 leaves nothing to sample
    filled = lm.infill("To be, [MASK:4] to be", cfg_scale=1.0, seed=0)
    assert filled.startswith("To be, ") and filled.endswith(" to be") and "[MASK" not in filled


@pytest.mark.parametrize("options", [
    {"sampler": "dream", "remasking": "entropy"}, {"sampler": "dream", "remasking": "maskgit_plus", "top_p": 0.9},
    {"sampler": "dream", "remasking": "origin", "temperature": 0.5}, {"sampler": "dream", "remasking": "topk_margin",
                                                                      "alg_temp": 0.5},
    {"sampler": "mdlm"}, {"sampler": "mdlm_cache", "temperature": 0.8}, {"sampler": "llada", "remasking": "random"},
    {"sampler": "fast_dllm", "threshold": 0.5}, {"sampler": "fast_dllm", "factor": 1.0, "cache": "dual"},
    {"sampler": "fast_dllm", "threshold": 0.7, "cache": "prefix"}, {"sampler": "llada", "cache": "dual"},
])
def test_every_sampler_runs_from_the_pipeline(lm, options):
    ids = lm.generate(["ROMEO:\n", "Ay"], max_new_tokens=16, steps=8, block_length=16, seed=0, **options)
    again = lm.generate(["ROMEO:\n", "Ay"], max_new_tokens=16, steps=8, block_length=16, seed=0, **options)
    assert ids == again and all(isinstance(t, str) for t in ids)
    # the same call on ids: the prompt kept, 16 new tokens, no [MASK] or [BOS] left, and the text is their decoding
    tok = lm.tokenizer
    prompt = tok.encode("ROMEO:\n")
    out = lm.generate(torch.tensor([prompt]), max_new_tokens=16, steps=8, block_length=16, seed=0, **options)
    assert out.shape == (1, len(prompt) + 16) and out[0, : len(prompt)].tolist() == prompt
    assert not {tok.mask_id, tok.bos_id} & set(out[0].tolist())
    assert lm.decode_new(out[0, len(prompt):].tolist()) == ids[0]


def test_threshold_decoding_and_caches_save_forward_passes(lm):
    def nfe(**kw):
        events = list(lm.stream(["ROMEO:\n", "Ay"], max_new_tokens=32, steps=32, block_length=16, **kw))
        assert not (events[-1].output.xt == lm.tokenizer.mask_id).any()
        return len(events)

    assert nfe() == 32
    assert nfe(sampler="fast_dllm", threshold=0.1) < 32  # the tiny test model is rarely more confident
    # a prefix cache changes the cost of each step, not their number; its first step per block is exact
    assert nfe(cache="prefix") == 32
    with pytest.raises(SamplingError, match="cache='none'"):
        lm.generate("ROMEO:", max_new_tokens=8, steps=8, cfg_scale=1.0, cache="dual")


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_batch_composition_does_not_change_a_row_with_caches(lm, cache):
    kw = dict(max_new_tokens=16, steps=16, block_length=8, cache=cache, sampler="fast_dllm", threshold=0.2)
    prompts = ["ROMEO:\n", "HAMLET:\nTo be, or not to be,", "Ay"]
    assert lm.generate(prompts, **kw) == [lm.generate(p, **kw) for p in prompts]


def test_generation_config_round_trips_through_json(tmp_path):
    from dlm.config import ConfigError, GenerationConfig

    cfg = GenerationConfig(sampler="dream", remasking="entropy", top_p=0.9, num_samples=3)
    cfg.save_json(tmp_path / "gen.json")
    assert GenerationConfig.load_json(tmp_path / "gen.json") == cfg
    with pytest.raises(ConfigError, match="unknown GenerationConfig key"):
        GenerationConfig.from_dict({"stepz": 3})


def test_windowed_head_gives_the_same_tokens_as_the_full_head(lm, monkeypatch):
    """The LLaDA sampler computes the head only where it can commit; the tokens equal the full computation."""
    kw = dict(max_new_tokens=32, steps=16, block_length=16, seed=0)
    prompts = ["ROMEO:\n", "HAMLET:\nTo be, or not to be,"]
    calls = []
    original = type(lm.model).forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("logits_window"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(lm.model), "forward", spy)
    windowed = lm.generate(prompts, **kw)
    sampled = lm.generate(prompts, temperature=0.8, top_k=20, **kw)
    n = len(calls)
    penalised = lm.generate(prompts, temperature=0.8, top_p=0.9, repetition_penalty=1.3, **kw)  # reads the prompt
    assert len(calls) > n and all(w is not None for w in calls[n:])  # the penalty reads the canvas, keeps the window
    assert penalised != lm.generate(prompts, temperature=0.8, top_p=0.9, **kw)  # and it was applied
    infilled = lm.infill("To be, or not to be, [MASK] is the question.", max_span=16, seed=0)
    assert any(w is not None for w in calls)
    monkeypatch.setattr(type(lm.model), "supports_logits_window", False, raising=False)
    calls.clear()
    assert lm.generate(prompts, **kw) == windowed
    assert lm.generate(prompts, temperature=0.8, top_k=20, **kw) == sampled
    assert lm.generate(prompts, temperature=0.8, top_p=0.9, repetition_penalty=1.3, **kw) == penalised
    assert lm.infill("To be, or not to be, [MASK] is the question.", max_span=16, seed=0) == infilled
    assert all(w is None for w in calls)


# ----- behaviour on a hand-built network whose logits the test controls ------------------------------------------
class ScriptedNet(torch.nn.Module):
    """Fixed random logits that depend on the position, the token before it and the mean over the canvas: the
    commit order and the prompt (guidance) matter, and the test can recompute every step. [MASK] and [BOS] have
    the highest logits everywhere (the sampler must ban them); of the rest only printable ASCII can win (never
    [EOS] or [PAD], so deferring them changes nothing, and a byte is a character)."""

    causal = False
    needs_time = False

    def __init__(self, vocab: int, max_len: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(max_len, vocab, generator=g) * 2.0  # (L, V)
        self.pair = torch.randn(vocab, vocab, generator=g) * 2.0  # (V, V): the previous token's vote
        # (V, V): every token's vote everywhere; small integers, so their sum is exact in any order or batch
        self.context = torch.randint(-8, 9, (vocab, vocab), generator=g).float()
        self.base[:, [i for i in range(vocab) if not 32 <= i < 127]] = -50.0
        self.base[:, [257, 259]] = 50.0  # ByteTokenizer's [MASK] and [BOS]
        self.calls = 0

    def forward(self, x, t=None, attention_mask=None):
        self.calls += 1
        B, L = x.shape
        prev = torch.cat([torch.zeros(B, 1, dtype=x.dtype), x[:, :-1]], 1)  # (B, L)
        return self.base[:L][None] + self.pair[prev] + self.context[x].sum(1, keepdim=True) / L  # (B, L, V)


def _scripted_lm():
    from dlm.config import CheckpointConfig, ModelConfig
    from dlm.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = CheckpointConfig(model=ModelConfig.preset("tiny", max_len=128))
    return DiffusionLM(ScriptedNet(tok.vocab_size), tok, cfg)


def _reference_greedy(net, tok, prompt: list[int], gen: int, steps: int, block: int, scale: float = 0.0):
    """LLaDA's greedy low-confidence decode written out: per block, steps // n_blocks steps committing the most
    confident masked positions of the block (the count split as evenly as possible, the remainder first), the
    prediction the argmax of the (guided) logits with [MASK], [BOS] and [PAD] banned."""
    P, n_blocks = len(prompt), gen // block
    per_block = steps // n_blocks
    x = torch.tensor([prompt + [tok.mask_id] * gen])  # (1, P + gen)
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :P] = True
    for b in range(n_blocks):
        hi = P + (b + 1) * block
        plan = [block // per_block + (i < block % per_block) for i in range(per_block)]
        for k in plan:
            logits = net(x)  # (1, L, V) float32
            if scale:  # mixed in float32 as the pipeline mixes them, then scored in float64 as the sampler scores
                uncond = net(x.masked_fill(prompt_mask, tok.mask_id))
                logits = uncond + (scale + 1) * (logits - uncond)
            logits = logits.double()
            logits[..., [tok.mask_id, tok.bos_id, tok.pad_id]] = -torch.inf
            conf, x0 = logits.softmax(-1).max(-1)  # (1, L)
            masked = x == tok.mask_id
            masked[:, hi:] = False
            conf = torch.where(masked, conf, -torch.inf)
            top = conf[0].topk(k).indices
            x[0, top] = x0[0, top]
    return x


def test_greedy_decode_is_the_argmax_of_the_model_at_every_commit():
    lm = _scripted_lm()
    tok, net = lm.tokenizer, lm.model
    prompt = tok.encode("xy")
    kw = dict(max_new_tokens=16, steps=8, block_length=8, temperature=0.0)
    events = []
    net.calls = 0
    ids = lm.generate(torch.tensor([prompt]), callback=events.append, **kw)
    assert net.calls == 8  # one forward per planned step, no more
    assert torch.equal(ids, _reference_greedy(net, tok, prompt, 16, 8, 8))
    # step by step: each commit is the model's argmax on the canvas it saw, at its most confident masked positions
    before = torch.tensor([prompt + [tok.mask_id] * 16])
    for i, e in enumerate(events):
        assert (e.block, e.step) == (i // 4, i)
        committed = e.output.committed[0]
        assert int(committed.sum()) == 2  # 8 masks per block over 4 steps
        logits = net(before)[0].double()
        logits[:, [tok.mask_id, tok.bos_id, tok.pad_id]] = -torch.inf
        conf, x0 = logits.softmax(-1).max(-1)
        masked = before[0] == tok.mask_id
        masked[len(prompt) + 8 * (e.block + 1):] = False
        assert committed.nonzero()[:, 0].tolist() == sorted(torch.where(masked, conf, -1.0).topk(2).indices.tolist())
        assert torch.equal(e.output.xt[0][committed], x0[committed])
        assert torch.equal(e.output.xt[0][~committed], before[0][~committed])  # nothing else changes
        before = e.output.xt
    assert torch.equal(before, ids)
    # the text API: the prompt is not repeated, exactly max_new_tokens bytes come back
    text = lm.generate("xy", **kw)
    assert text == tok.decode(ids[0, len(prompt):].tolist()) and len(tok.encode(text)) == 16


def test_guided_greedy_decode_mixes_conditional_and_unconditional_logits():
    lm = _scripted_lm()
    tok, net = lm.tokenizer, lm.model
    prompt = tok.encode("hello")
    kw = dict(max_new_tokens=8, steps=8, block_length=8, temperature=0.0)
    net.calls = 0
    guided = lm.generate(torch.tensor([prompt]), cfg_scale=1.5, **kw)
    assert net.calls == 8  # the conditional and unconditional copies share one forward
    assert torch.equal(guided, _reference_greedy(net, tok, prompt, 8, 8, 8, scale=1.5))
    assert not torch.equal(guided, lm.generate(torch.tensor([prompt]), **kw))  # guidance changed the answer


def test_infill_on_a_known_network_fills_the_gap_greedily_and_keeps_the_rest():
    lm = _scripted_lm()
    tok, net = lm.tokenizer, lm.model
    events = []
    net.calls = 0
    out = lm.infill("ab[MASK:4]cd", seed=0, callback=events.append)
    assert out.startswith("ab") and out.endswith("cd") and len(tok.encode(out)) == 8
    assert net.calls == 4 and [int(e.output.committed.sum()) for e in events] == [1, 1, 1, 1]  # steps = masks
    # one commit per step, the whole canvas one block: the suffix is seen from the first step (no left-to-right)
    canvas = tok.encode("ab") + [tok.mask_id] * 4 + tok.encode("cd")
    x = torch.tensor([canvas])
    for _ in range(4):
        logits = net(x).double()
        logits[..., [tok.mask_id, tok.bos_id]] = -torch.inf  # [PAD] may close a gap (it never wins here)
        conf, x0 = logits.softmax(-1).max(-1)
        best = int(torch.where(x == tok.mask_id, conf, -torch.inf)[0].argmax())
        x[0, best] = x0[0, best]
    assert out == tok.decode(x[0].tolist())
