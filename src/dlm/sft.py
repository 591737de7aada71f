"""Instruction tuning (SFT) as LLaDA does it: chats -> prompt / response pairs -> response-only masked diffusion.

LLaDA (Nie et al. 2025, section 2.4 and GUIDELINES.md of ML-GSAI/LLaDA) fine-tunes on pairs (prompt, response):
the prompt is never masked and not in the loss; the response is masked at rate t and each row's weighted
cross-entropy is divided by its answer length (dlm.losses.SFTLoss). Pairs are padded with EOS to the longest
pair of the batch, and the padding counts as response (`SFTConfig.eos_padding = "response"`), so the model learns
to end its answers by filling the rest of the canvas with EOS; `"context"` leaves the padding clean and unscored.

The data is JSONL, one `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}` per line.
The last message is the response (earlier turns are prompt). A tokenizer with a chat template (LLaDA, Dream)
renders the chat with it, the response ending at its end-of-turn token; a tokenizer without one (our byte and
BPE tokenizers) uses the plain FALLBACK format below, the response ending with [EOS]:

    User: Who says: "To be, or not to be: that is the question"?
    Assistant: HAMLET[EOS]

    summary = finetune(SFTConfig(data="chats.jsonl"), TrainConfig(out="runs/sft", max_steps=500), model="default")
    ids = chat_prompt(tok, [{"role": "user", "content": "Who says: ...?"}])   # the prompt to generate from
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlm.config import CheckpointConfig, ConfigError, SFTConfig, TrainConfig
from dlm.data import Batch, CorpusError, _mix
from dlm.io import read_jsonl
from dlm.tokenizer import Tokenizer, plain_chat

if TYPE_CHECKING:
    from dlm.distributed import DistEnv
    from dlm.lora import LoRAConfig

Messages = list[dict[str, str]]
_SENTINEL = "\x00dlm-response\x00"


# ----- rendering ----------------------------------------------------------------------------------------------
def fallback_prompt(messages: Messages) -> str:
    """The plain format (dlm.tokenizer.plain_chat): `Role: content` per line, then `Assistant: `."""
    return plain_chat(messages, add_generation_prompt=True)


def uses_template(tok: Tokenizer, template: str) -> bool:
    if template not in ("auto", "fallback"):
        raise ConfigError(f"template must be auto or fallback, got {template!r}")
    return template == "auto" and tok.has_chat_template


def chat_prompt(tok: Tokenizer, messages: Messages, template: str = "auto") -> list[int]:
    """The ids a model fine-tuned with `template` generates its answer to `messages` from."""
    if uses_template(tok, template):
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    return tok.encode(fallback_prompt(messages))


def encode_chat(tok: Tokenizer, messages: Messages, template: str = "auto") -> tuple[list[int], list[int]]:
    """A chat -> (prompt ids, response ids). The response is the last message, up to and including the template's
    end-of-turn (the first stop id after it), or followed by [EOS] in the fallback format."""
    *history, last = messages
    if not uses_template(tok, template):
        return tok.encode(fallback_prompt(history)), tok.encode(last["content"]) + [tok.eos_id]
    # Where the answer sits in the rendered chat: render it once with a sentinel in its place.
    marked = tok.apply_chat_template([*history, {**last, "content": _SENTINEL}], add_generation_prompt=False)
    prefix, sep, suffix = marked.partition(_SENTINEL)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    if not sep or not full.startswith(prefix) or not full.endswith(suffix):
        raise ConfigError("the chat template does not write the answer verbatim; use template='fallback'")
    response = tok.encode(full[len(prefix):len(full) - len(suffix)] + suffix)
    end = next((i + 1 for i, t in enumerate(response) if t in tok.stop_ids), None)
    return tok.encode(prefix), response[:end] if end is not None else response + [tok.eos_id]


def load_chats(path: str | Path) -> list[Messages]:
    """JSONL of {"messages": [{"role", "content"}, ...]} whose last message is the assistant's answer."""
    path = Path(path)
    chats = []
    for n, rec in read_jsonl(path, expect='a JSON object {"messages": [...]}', error=CorpusError):
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)
        if not ok or msgs[-1]["role"] != "assistant":
            raise CorpusError(f'{path}, line {n}: "messages" must be >= 2 {{"role", "content"}} objects, the last '
                              "the assistant's answer")
        chats.append(msgs)
    if not chats:
        raise CorpusError(f"{path} holds no chats")
    return chats


# ----- batches ------------------------------------------------------------------------------------------------
class ChatData:
    """(prompt, response) pairs -> batches (B, L) padded with EOS to the batch's longest pair; a pure function of
    (seed, step), every pair once per epoch in an order drawn per epoch."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], eos_id: int, seq_len: int,
                 eos_padding: str = "response") -> None:
        if eos_padding not in ("response", "context"):
            raise ConfigError(f"eos_padding must be response or context, got {eos_padding!r}")
        self.pairs = [(p, r) for p, r in pairs if len(p) + len(r) <= seq_len and r]
        self.dropped = len(pairs) - len(self.pairs)  # longer than seq_len: dropped rather than cut
        if not self.pairs:
            raise CorpusError(f"no chat fits seq_len={seq_len} tokens; raise --seq-len")
        self.eos_id, self.eos_padding = eos_id, eos_padding

    def __len__(self) -> int:
        return len(self.pairs)

    @lru_cache(maxsize=4)  # noqa: B019 (a few epochs' orders, for the life of the dataset)
    def _order(self, seed: int, epoch: int) -> list[int]:
        return torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(_mix(seed + 13, epoch))).tolist()

    def sample(self, step: int, batch_size: int, seed: int) -> Batch:
        """x0 (B, L) and maskable (B, L): the response (and, by policy, its EOS padding)."""
        n = len(self.pairs)
        idx = [self._order(seed, i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)]
        rows = [self.pairs[i] for i in idx]
        L = max(len(p) + len(r) for p, r in rows)
        x0 = torch.full((batch_size, L), self.eos_id, dtype=torch.long)
        maskable = torch.zeros(batch_size, L, dtype=torch.bool)
        for b, (p, r) in enumerate(rows):
            x0[b, :len(p) + len(r)] = torch.tensor(p + r)
            end = len(p) + len(r) if self.eos_padding == "context" else L
            maskable[b, len(p):end] = True
        return Batch(x0, maskable)


# ----- the recipe ---------------------------------------------------------------------------------------------
def check_sft_model(cfg: CheckpointConfig) -> None:
    if cfg.process.process not in ("masked", "bd3lm") or cfg.model.arch == "ar":
        raise ConfigError(f"SFT follows LLaDA's recipe for masked diffusion models; this checkpoint is "
                          f"{cfg.process.process!r} / arch {cfg.model.arch!r}")


def finetune(sft: SFTConfig, tcfg: TrainConfig, model: str = "default", lora: LoRAConfig | None = None,
             device: str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune a loaded model (any format) on chats; with `lora`, train adapters only. Re-running the same call
    resumes from the run folder's latest checkpoint. Returns a summary (also written to OUT/summary.json)."""
    from dlm.distributed import init_distributed

    env = init_distributed(device)
    try:
        return _finetune(sft, tcfg, model, lora, env, show_progress)
    finally:
        env.close()


def _finetune(sft: SFTConfig, tcfg: TrainConfig, model: str, lora: LoRAConfig | None, env: DistEnv,
              show_progress: bool) -> dict[str, Any]:
    from dlm.callbacks import run_callbacks
    from dlm.checkpoint import load_pretrained
    from dlm.lora import apply_lora, finish_fit, merged_weights
    from dlm.losses import SFTLoss
    from dlm.pipeline import resolve_model_path
    from dlm.processes.masked import build_process
    from dlm.train import validate_train
    from dlm.trainer import Trainer

    validate_train(tcfg)
    if tcfg.random_length_prob > 0:
        raise ConfigError("random_length_prob is a pretraining option: it would cut responses")
    chats = load_chats(sft.data)[:sft.max_examples]  # every line checked before the (maybe large) model loads
    net, cfg, tok = load_pretrained(resolve_model_path(model), map_location="cpu")
    check_sft_model(cfg)
    if tcfg.seq_len > cfg.model.max_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_len={cfg.model.max_len}")
    data = ChatData([encode_chat(tok, m, sft.template) for m in chats], tok.eos_id, tcfg.seq_len, sft.eos_padding)
    cfg = cfg.replace(extra={**cfg.extra, "base_model": str(model), "sft": sft.to_dict(),
                             **({"lora": lora.to_dict()} if lora else {})})
    export = None
    if lora is not None:
        if tcfg.fsdp:
            raise ConfigError("LoRA trains few parameters: run it with DDP (drop --fsdp)")
        torch.manual_seed(tcfg.seed)  # the adapters' initialisation
        net = apply_lora(net, lora)
        export = lambda state: merged_weights(state, lora)  # noqa: E731 (checkpoints hold the merged model)
    loss_fn = SFTLoss(antithetic=cfg.process.antithetic)
    if cfg.process.process == "bd3lm":  # a block model: the response masked per block, the prompt clean before it
        from dlm.losses import BlockSFTLoss

        loss_fn = BlockSFTLoss.from_config(cfg.process)
    process = build_process(cfg.process, tok, cfg.model.vocab_size)
    trainer = Trainer(net, loss_fn, process, data, tcfg, run_callbacks(cfg, tok, export=export), dist=env,
                      show_progress=show_progress)
    history = trainer.fit()
    summary = {"out": str(Path(tcfg.out)), "steps": trainer.step, "chats": len(data), "dropped": data.dropped}
    return finish_fit(trainer, history, summary, lora, cfg, tok, env.is_main)
