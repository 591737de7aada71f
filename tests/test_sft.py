"""SFT (LLaDA's recipe): chats render to prompt / response, only the response is masked, the loss is normalised by
answer length with EOS padding counted as response; the random-length pretraining trick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm.data import Batch, random_length
from dlm.losses import LOSSES
from dlm.process import MaskedProcess
from dlm.schedules import Linear, sample_t
from dlm.sft import ChatData, chat_prompt, encode_chat, load_chats
from dlm.tokenizer import ByteTokenizer

LLADA = Path(__file__).parent / "data/hf/llada-tiny"
EOS, MASK = 258, 257
CHATS = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]


def _batch(policy: str) -> Batch:
    """The two chats in one batch, rows in CHATS order."""
    tok = ByteTokenizer()
    data = ChatData([encode_chat(tok, m) for m in CHATS], tok.eos_id, seq_len=64, eos_padding=policy)
    b = data.sample(0, 2, seed=0)
    order = [0, 1] if b.x0[0, 6] == ord("2") else [1, 0]
    return Batch(b.x0[order], b.maskable[order])


def test_fallback_format_by_hand():
    tok = ByteTokenizer()
    prompt, response = encode_chat(tok, CHATS[0])
    assert bytes(prompt).decode() == "User: 2+2?\nAssistant: "
    assert response == [ord("4"), EOS]
    system = [{"role": "system", "content": "Be brief."}, *CHATS[0][:1]]
    assert bytes(chat_prompt(tok, system)).decode() == "System: Be brief.\nUser: 2+2?\nAssistant: "


def test_batch_masks_only_the_response_and_pads_with_eos_by_hand():
    b = _batch("response")
    # Row 0: 22 prompt bytes, "4" [EOS], then 2 [EOS] of padding to the batch length 26 (row 1: 20 + 6).
    assert b.x0.shape == (2, 26)
    assert bytes(b.x0[0, :22].tolist()).decode() == "User: 2+2?\nAssistant: "
    assert b.x0[0, 22:].tolist() == [ord("4"), EOS, EOS, EOS]
    assert b.x0[1, 20:].tolist() == [*b"Hello", EOS]
    assert b.maskable[0].nonzero().flatten().tolist() == [22, 23, 24, 25]  # padding is response (LLaDA)
    assert b.maskable[1].nonzero().flatten().tolist() == list(range(20, 26))
    c = _batch("context")
    assert torch.equal(c.x0, b.x0)
    assert c.maskable[0].nonzero().flatten().tolist() == [22, 23]  # the padding stays clean


class FixedLogits(nn.Module):
    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, xt, t=None):
        self.seen.append(xt.clone())
        return self.logits


@pytest.mark.parametrize("eps", [0.999999, 0.1], ids=["all-response-masked", "partial"])
def test_sft_loss_by_hand(eps):
    b = _batch("response")
    process = MaskedProcess(MASK, Linear(eps=eps))
    model = FixedLogits((2, 26, 260))
    out = LOSSES.build("sft")(model, b.x0, process, maskable=b.maskable, generator=torch.Generator().manual_seed(4))
    # Replay the draws: t stratified over the batch, then the uniforms of the mask.
    g = torch.Generator().manual_seed(4)
    t = sample_t(2, True, g)
    mask = (torch.rand(2, 26, generator=g) < process.schedule.move_chance(t)[:, None]) & b.maskable
    assert torch.equal(out.mask, mask) and mask.any()
    xt = model.seen[0]
    assert torch.equal(xt[~b.maskable], b.x0[~b.maskable])  # the prompt is never masked
    assert (xt[mask] == MASK).all()
    if eps > 0.5:
        assert torch.equal(mask, b.maskable)
    ce = -F.log_softmax(model.logits.detach().double(), -1).gather(-1, b.x0[..., None])[..., 0]  # (2, 26)
    p = (1 - eps) * t.double() + eps
    per_row = (ce * mask / p[:, None]).sum(1) / torch.tensor([4.0, 6.0])  # answer lengths, padding included
    assert out.loss.item() == pytest.approx(per_row.mean().item(), rel=1e-5)
    out.loss.backward()
    touched = model.logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, mask)  # the loss reads the response's masked positions only


def test_chat_template_response_ends_at_its_end_of_turn():
    pytest.importorskip("transformers")
    from dlm.checkpoint import load_pretrained

    _, _, tok = load_pretrained(LLADA)
    prompt, response = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert prompt == chat_prompt(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(prompt, skip_special=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(response, skip_special=False) == "yo<|eot_id|>"  # not the template's next header
    assert response[-1] in tok.stop_ids


def test_random_length_cuts_the_whole_batch():
    b = Batch(torch.arange(40).view(4, 10), torch.ones(4, 10, dtype=torch.bool))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    cut = random_length(b, 1.0, g())
    n = cut.x0.shape[1]
    assert 1 <= n <= 10 and torch.equal(cut.x0, b.x0[:, :n]) and cut.maskable.shape == (4, n)
    assert random_length(b, 0.0, g()) is b
    lengths = {random_length(b, 1.0, torch.Generator().manual_seed(s)).x0.shape[1] for s in range(50)}
    assert len(lengths) > 5  # uniform over 1..L


def test_bad_chats_are_one_line_errors(tmp_path, capsys):
    from dlm.cli import main
    from dlm.data import CorpusError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0][:1]}) + "\n")
    with pytest.raises(CorpusError, match="bad.jsonl, line 1"):
        load_chats(bad)
    with pytest.raises(SystemExit) as e:
        main(["sft", "--data", str(bad), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "the last the assistant's answer" in capsys.readouterr().err


def test_dlm_sft_fine_tunes_a_byte_model(tmp_path, capsys):
    from dlm.checkpoint import load_pretrained, save_pretrained
    from dlm.cli import main
    from dlm.config import CheckpointConfig, ModelConfig
    from dlm.models import build_model

    torch.manual_seed(0)
    base = tmp_path / "base"
    cfg = CheckpointConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_len=64))
    save_pretrained(base, build_model(cfg.model), cfg, ByteTokenizer())
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 4))
    main(["sft", "--model", str(base), "--data", str(chats), "--out", str(tmp_path / "run"), "--max-steps", "30",
          "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--warmup", "2", "--log-every", "1",
          "--ckpt-every", "30", "--threads", "1", "--quiet"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["chats"] == 8
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    net, saved, _ = load_pretrained(tmp_path / "run")
    assert saved.extra["sft"]["eos_padding"] == "response" and saved.model.d_model == 32
