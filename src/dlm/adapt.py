"""`dlm adapt`: turn an autoregressive LM into a masked diffusion LM, as Dream, DiffuGPT and DiffuLLaMA were made.

A Hugging Face causal-LM folder (Llama, Qwen2, Qwen3 families; dlm/formats/hf_causal.py) loads onto our network;
adaptation keeps every weight and changes three things (Gong et al. 2025, "Scaling Diffusion Language Models via
Adaptation from Autoregressive Models" (DiffuGPT / DiffuLLaMA); Ye et al. 2025, Dream 7B):

- the logit shift (`ModelConfig.logits_shift`, mode "shift"): the hidden state at i - 1 predicts token i, as it did
  under next-token training, so the head keeps its meaning; a masked token is predicted by its left neighbour's
  state. Each training row is [BOS] + L - 1 tokens and [BOS] is never masked, so every masked position has one;
- attention-mask annealing (DiffuLLaMA): at step s a query may attend to a later key with probability
  min(1, s / anneal_steps), on top of the causal mask, so step 0 is the AR model's causal attention and from
  `anneal_steps` on it is the full bidirectional attention a diffusion LM samples with;
- a [MASK] token: a spare embedding row where the vocabulary has one (Qwen pads its rows, as Dream used), else
  one row appended; its input embedding starts at the mean of the real tokens' (its output row at zero).

The objective is LLaDA's masked ELBO (1 / p_mask weighted cross-entropy over masked tokens, per scored token).
Full fine-tuning or LoRA (dlm/lora.py), the same Trainer (resumable: re-run the same command), and every checkpoint
is a dlm folder that every sampler loads: `DiffusionLM.from_pretrained(out)`.

Mode "block" (the route of Fast-dLLM v2, Wu et al. 2025, and SDAR): the network becomes a block
diffusion model (BD3LM, dlm/processes/block.py): block-causal attention from the first step (no annealing), a time
per block, each noisy block predicted from itself and the clean blocks before it in one x_t + x_0 pass (the bd3lm
loss), sampled block by block against an exact KV cache (the "block" sampler). It is trained without the logit
shift: position i predicts its own token, as dlm's bd3lm networks do (Fast-dLLM v2 keeps the shift). With
`complementary` each row is also trained under the complement of its mask (Fast-dLLM v2's complementary masks:
every token of the row is scored once, at time t or at 1 - t).

    summary = adapt("~/.cache/dlm/judge/SmolLM2-135M-Instruct", AdaptConfig(mode="shift", anneal_steps=50),
                    TrainConfig(data="shakespeare", out="runs/a2d", max_steps=200, batch_size=8, seq_len=128))
    lm = DiffusionLM.from_pretrained("runs/a2d"); lm.generate("ROMEO:")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dlm.config import CheckpointConfig, ConfigError, GenerationConfig, ProcessConfig, TrainConfig, _Config
from dlm.data import Batch, TokenStream
from dlm.losses import LOSSES, BlockDiffusionELBO, Loss, LossOutput, Rows, corrupt, draw_t, token_ce
from dlm.tokenizer import HFTokenizer, IdsOnlyTokenizer, Tokenizer

if TYPE_CHECKING:
    from dlm.distributed import DistEnv
    from dlm.lora import LoRAConfig

MODES = ("shift", "block")


@dataclass
class AdaptConfig(_Config):
    mode: str = "shift"  # shift: Dream / DiffuGPT logit shift, full attention; block: BD3LM block diffusion
    anneal_steps: int | None = None  # shift: causal -> full attention over the first N steps; None: max_steps / 10
    block_size: int = 4  # block: tokens per block (1 is AR; the longer, the more tokens decoded in parallel)
    complementary: bool = False  # block: each row also under the complement of its mask (Fast-dLLM v2)

    def validate(self) -> AdaptConfig:
        if self.mode not in MODES:
            raise ConfigError(f"adapt mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.anneal_steps is not None and self.anneal_steps < 0:
            raise ConfigError(f"anneal_steps must be >= 0 (0: full attention from the start), got {self.anneal_steps}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.complementary and self.mode != "block":
            raise ConfigError("complementary masks are a block-mode option (Fast-dLLM v2): add --mode block")
        return self

    def anneal_for(self, max_steps: int) -> int:
        return self.anneal_steps if self.anneal_steps is not None else max_steps // 10


# ----- attention-mask annealing -------------------------------------------------------------------------------
def anneal_ratio(step: int, anneal_steps: int) -> float:
    """The chance that a query may see a given later key at `step`: 0 at step 0, 1 from `anneal_steps` on."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def annealed_mask(L: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """(L, L) bool, True = query i may attend to key j: causal, or-ed with each later key at chance `ratio` (one
    draw per step, shared by the batch, as DiffuLLaMA); None for full attention (ratio >= 1: no draw)."""
    if ratio >= 1.0:
        return None
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    if ratio <= 0.0:
        return causal
    return causal | (torch.rand(L, L, generator=generator) < ratio)


class StepClock:
    """The step the trainer is on, set by the data when it draws the step's batch (the trainer calls
    `data.sample(step, ...)` before the loss of that step), read by the loss for its annealing: a pure function
    of the step, so a resumed run anneals exactly as an uninterrupted one."""

    def __init__(self) -> None:
        self.step = 0


class PrefixedWindows:
    """Random windows of L - 1 tokens after [BOS]: x0 (B, L), maskable (B, L) False at the [BOS] column only, so
    the shifted network always has a predictor (the state at i - 1) for a masked position i."""

    def __init__(self, stream: TokenStream, bos_id: int, clock: StepClock | None = None) -> None:
        self.stream, self.bos_id, self.clock = stream, bos_id, clock

    def sample(self, step: int, batch_size: int, seed: int) -> Batch:
        if self.clock is not None:
            self.clock.step = step
        w = self.stream.batch(step, batch_size, seed)  # (B, L - 1)
        x0 = torch.cat([torch.full((batch_size, 1), self.bos_id, dtype=w.dtype), w], 1)  # (B, L)
        maskable = torch.ones_like(x0, dtype=torch.bool)
        maskable[:, 0] = False
        return Batch(x0, maskable)


# ----- the objective ------------------------------------------------------------------------------------------
class ShiftedMaskedLoss(Loss):
    """LLaDA's masked ELBO on a shifted network (`logits_shift`: logits[i] comes from the state at i - 1) under the
    annealed attention mask of the clock's step; nats per scored (maskable) token."""

    def __init__(self, anneal_steps: int, clock: StepClock, antithetic: bool = True) -> None:
        super().__init__(antithetic=antithetic)
        self.anneal_steps, self.clock = anneal_steps, clock

    def attention(self, L: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """(L, L) bool of the current step, or None (full attention)."""
        return annealed_mask(L, anneal_ratio(self.clock.step, self.anneal_steps), generator)

    def __call__(self, model, x0, process, maskable=None, generator=None, rows: Rows | None = None):
        B, L = x0.shape
        t = draw_t(B, self.antithetic, generator, rows).to(x0.device)  # (B,)
        gen = generator if x0.device.type == "cpu" else None
        xt, is_masked = corrupt(process.q_sample, x0, t, gen, maskable, rows)
        attn = self.attention(L, generator)  # drawn on the CPU generator after the masks: the same on every rank
        return self.terms(model, x0, xt, is_masked, process.schedule.weight(t), maskable, attn)

    @staticmethod
    def terms(model: nn.Module, x0: torch.Tensor, xt: torch.Tensor, is_masked: torch.Tensor, weight: torch.Tensor,
              maskable: torch.Tensor | None, attn: torch.Tensor | None) -> LossOutput:
        """The loss at given masks: x0, xt, is_masked (B, L), weight (B,) = 1 / p_mask, attn (L, L) or None."""
        B, L = x0.shape
        attention = "full" if attn is None else attn.to(x0.device)  # (L, L): every row of the batch alike
        logits = model(xt, None, attention=attention)  # (B, L, V), already shifted by the network
        ce = token_ce(logits, x0)  # (B, L)
        n_tokens = maskable.sum().clamp_min(1) if maskable is not None else torch.tensor(B * L)
        loss = (ce * weight[:, None] * is_masked).sum() / n_tokens
        return LossOutput(loss=loss, nll=loss.detach(), mask=is_masked)


class ComplementaryBlockLoss(Loss):
    """Fast-dLLM v2's complementary masks on the bd3lm objective: with block times t (B, n_blocks) a row is masked
    once with chance t_b per token of block b (weight w(t_b) = 1 / t_b) and once with the complement of that mask,
    the maskable tokens the first left clean (chance 1 - t_b, weight 1 / (1 - t_b)); both in one batch of 2B rows.
    Each half is an unbiased estimate of the bd3lm bound (1 - t is uniform when t is); the loss is their mean.
    Needs move_chance(t) = t (BD3LM's log-linear schedule with eps 0, as dlm.adapt builds it)."""

    def __init__(self, antithetic: bool = True, clip: tuple[float, float] = (1e-3, 1.0 - 1e-3)) -> None:
        super().__init__(antithetic=antithetic)
        lo, hi = clip  # both weights finite: t and 1 - t stay in (0, 1)
        self.times = BlockDiffusionELBO(antithetic, clip=(max(lo, 1e-3), min(hi, 1.0 - 1e-3)))

    def terms(self, model, x0, process, t, generator, maskable=None, rows=None):
        """t (B, n_blocks) -> per-token loss (B, L) of both halves summed, is_masked, its complement (B, L)."""
        from dlm.processes.block import block_logits, per_position

        B, L = x0.shape
        bs = process.block_size
        probe = torch.tensor([0.25, 0.5])
        if not torch.allclose(process.schedule.move_chance(probe), probe):
            raise ConfigError("complementary masks need move_chance(t) = t (the loglinear schedule with eps 0)")
        gen = generator if x0.device.type == "cpu" else None
        xt, is_masked = corrupt(process.q_sample, x0, t, gen, maskable, rows)
        keep = maskable if maskable is not None else torch.ones_like(x0, dtype=torch.bool)
        comp = keep & ~is_masked  # (B, L)
        xc = torch.where(comp, torch.full_like(x0, process.mask_id), x0)
        ce = token_ce(block_logits(model, torch.cat([xt, xc]), torch.cat([x0, x0]), bs), torch.cat([x0, x0]))
        w = per_position(process.schedule.weight(t.to(x0.device)), L, bs)  # (B, L): 1 / t_b
        wc = per_position(process.schedule.weight((1.0 - t).to(x0.device)), L, bs)  # 1 / (1 - t_b)
        per_token = torch.where(is_masked, ce[:B] * w, 0.0) + torch.where(comp, ce[B:] * wc, 0.0)
        return per_token, is_masked, comp

    def __call__(self, model, x0, process, maskable=None, generator=None, rows: Rows | None = None):
        B, L = x0.shape
        t = self.times.block_times(B, L, process, generator, rows).to(x0.device)  # (B, n_blocks)
        per_token, is_masked, _ = self.terms(model, x0, process, t, generator, maskable, rows)
        n_tokens = maskable.sum().clamp_min(1) if maskable is not None else torch.tensor(B * L)
        loss = per_token.sum() / (2 * n_tokens)
        return LossOutput(loss=loss, nll=loss.detach(), mask=is_masked)


# ----- the network --------------------------------------------------------------------------------------------
def to_diffusion(net: nn.Module, cfg: CheckpointConfig, tok: Tokenizer, mode: str = "shift", block_size: int = 4
                 ) -> tuple[nn.Module, CheckpointConfig, Tokenizer]:
    """A loaded AR model (arch "ar") -> the same weights in a diffusion network with a [MASK] row: shifted and
    bidirectional (mode shift), or unshifted under block-causal attention (mode block, a bd3lm model)."""
    from dlm.formats.base import materialise_buffers
    from dlm.models import build_model

    m = cfg.model
    if m.arch != "ar":
        raise ConfigError(f"dlm adapt converts an autoregressive model (a Hugging Face causal-LM folder or a dlm AR "
                          f"baseline); this one is arch {m.arch!r}, already a diffusion model")
    if isinstance(tok, IdsOnlyTokenizer):
        raise ConfigError(f"{tok.source} has no tokenizer files, and adaptation reads text: copy the model's "
                          "tokenizer files into the folder")
    V = max(m.vocab_size, tok.mask_id + 1)
    new_cfg = m.replace(arch="llada", logits_shift=mode == "shift", vocab_size=V)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    n_real = min(tok.mask_id, m.vocab_size)  # the rows of real tokens
    for name in ("wte.weight", "lm_head.weight"):
        w = sd[name]
        if V > w.shape[0]:
            w = torch.cat([w, w.new_zeros(V - w.shape[0], w.shape[1])])
        else:
            w = w.clone()
        if name == "wte.weight":
            w[tok.mask_id] = sd[name][:n_real].mean(0)  # an input the network reads as 'some token'
        else:
            w[tok.mask_id] = 0.0  # never a target (x0 holds no [MASK]); banned when sampling
        sd[name] = w
    device = next(net.parameters()).device
    with torch.device("meta"):
        out = build_model(new_cfg)
    out.load_state_dict(sd, assign=True)
    materialise_buffers(out, new_cfg, device)
    if isinstance(tok, HFTokenizer):
        tok = HFTokenizer(tok.hf, mask_id=tok.mask_id, eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id,
                          stop_ids=tok.stop_ids, vocab_size=V)
    if mode == "block":  # BD3LM's process defaults (dlm.processes.block.BlockProcess), blocks of block_size
        process = ProcessConfig(process="bd3lm", schedule="loglinear", loss="bd3lm", eps=0.0, block_size=block_size,
                                clip_min=1e-3, clip_max=1.0)
        sampling = GenerationConfig(max_new_tokens=64, steps=64, sampler="block")
    else:  # Dream's way of sampling a shifted model: one block, steps = new tokens, the entropy rule
        process = ProcessConfig(process="masked", schedule="linear", loss="masked_elbo")
        sampling = GenerationConfig(max_new_tokens=64, steps=64, block_length=0, sampler="dream", remasking="entropy")
    extra = {k: v for k, v in cfg.extra.items() if k != "tokenizer"}
    adapted = CheckpointConfig(model=new_cfg, process=process, sampling=sampling, extra=extra)
    return out.train(), adapted, tok


# ----- held-out bound ----------------------------------------------------------------------------------------
def heldout_bound(model: nn.Module, windows: torch.Tensor, bos_id: int, mask_id: int, n_samples: int = 1,
                  batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """windows (N, n) of held-out tokens -> (N,) float64: LLaDA's estimate of -ELBO in nats per window, each scored
    after [BOS] (as the model was adapted, and as the AR model's exact NLL in dlm.eval.elbo conditions on [BOS]):
    dlm.eval.elbo.elbo_bits with its never-masked [BOS] column, averaged over `n_samples` draws per window."""
    from dlm.eval.elbo import elbo_bits

    return elbo_bits(model, windows, mask_id, bos_id, n_samples=n_samples, batch_size=batch_size, seed=seed,
                     bos_prefix=True).nats_per_window


# ----- the recipe ---------------------------------------------------------------------------------------------
def adapt(model: str | Path, acfg: AdaptConfig, tcfg: TrainConfig, lora: LoRAConfig | None = None,
          device: str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Adapt the causal LM at `model` on `tcfg.data`; re-running the same call resumes from `tcfg.out`.
    Returns a summary (also written to OUT/summary.json)."""
    from dlm.distributed import init_distributed

    acfg.validate()
    env = init_distributed(device)
    try:
        return _adapt(model, acfg, tcfg, lora, env, show_progress)
    finally:
        env.close()


def _adapt(model: str | Path, acfg: AdaptConfig, tcfg: TrainConfig, lora: LoRAConfig | None, env: DistEnv,
           show_progress: bool) -> dict[str, Any]:
    from dlm.callbacks import run_callbacks
    from dlm.checkpoint import load_pretrained
    from dlm.data import load_corpus, split_documents, tokenize_documents
    from dlm.lora import apply_lora, finish_fit, merged_weights
    from dlm.pipeline import resolve_model_path
    from dlm.precision import set_threads
    from dlm.processes.masked import build_process
    from dlm.trainer import Trainer

    tcfg.validate()
    if tcfg.random_length_prob > 0 or tcfg.fsdp and lora is not None:
        raise ConfigError("adapt takes neither random_length_prob nor FSDP with LoRA")
    if tcfg.seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 ([BOS] and one token), got {tcfg.seq_len}")
    set_threads(tcfg.threads)  # before the (maybe large) model loads
    docs = load_corpus(tcfg.data)  # a missing corpus fails before the (maybe large) model loads
    net, cfg, tok = load_pretrained(resolve_model_path(model), map_location="cpu")
    net, cfg, tok = to_diffusion(net, cfg, tok, acfg.mode, acfg.block_size)
    if tcfg.seq_len > cfg.model.max_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_len={cfg.model.max_len}")
    train_docs, _ = split_documents(docs, tcfg.val_fraction)  # the validation split stays unseen, as dlm train
    clock = StepClock()
    data = PrefixedWindows(TokenStream(tokenize_documents(train_docs, tok), tcfg.seq_len - 1), tok.bos_id, clock)
    anneal = acfg.anneal_for(tcfg.max_steps) if acfg.mode == "shift" else 0
    # bos_prefix: every training row starts with [BOS], so DiffusionLM puts one before a text prompt too
    cfg = cfg.replace(extra={**cfg.extra, "base_model": str(model), "bos_prefix": True, "adapt": {
                             **acfg.to_dict(), "anneal_steps": anneal}, **({"lora": lora.to_dict()} if lora else {})})
    export = None
    if lora is not None:
        torch.manual_seed(tcfg.seed)  # the adapters' initialisation
        net = apply_lora(net, lora)
        export = lambda state: merged_weights(state, lora)  # noqa: E731 (checkpoints hold the merged model)
    if acfg.mode == "block":
        loss_fn: Loss = (ComplementaryBlockLoss(cfg.process.antithetic, (cfg.process.clip_min, cfg.process.clip_max))
                         if acfg.complementary else LOSSES.get("bd3lm").from_config(cfg.process))
    else:
        loss_fn = ShiftedMaskedLoss(anneal, clock, antithetic=cfg.process.antithetic)
    process = build_process(cfg.process, tok, cfg.model.vocab_size)
    trainer = Trainer(net, loss_fn, process, data, tcfg, run_callbacks(cfg, tok, export=export), dist=env,
                      show_progress=show_progress)
    history = trainer.fit()
    summary = {"out": str(Path(tcfg.out)), "steps": trainer.step, "mode": acfg.mode, "anneal_steps": anneal,
               "tokens": trainer.step * tcfg.batch_size * (tcfg.seq_len - 1)}
    return finish_fit(trainer, history, summary, lora, cfg, tok, env.is_main)
