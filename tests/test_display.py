"""Display callbacks: the live terminal canvas and the recorded trajectory with its self-contained HTML page."""

from __future__ import annotations

import html
import io
import json
import re

import pytest
import torch
from rich.console import Console

from dlm.sampling import LLaDASampler, denoise
from dlm.sampling.display import MASK_GLYPH, LiveCanvas, TokenTexts, Trajectory, visible
from dlm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPT = "Say:"


def fixed_model(target: str, P: int):
    """A denoiser whose logits spell `target` after the prompt, more confident towards the end."""
    ids = TOK.encode(target)
    logits = torch.zeros(1, P + len(ids), TOK.vocab_size)
    for i, t in enumerate(ids):
        logits[0, P + i, t] = 2.0 + 0.1 * i
    return lambda x: logits.expand(x.shape[0], -1, -1).clone()


def run(target: str, steps: int, callback, block_length=None, B: int = 1):
    prompt = TOK.encode(PROMPT)
    P, N = len(prompt), len(TOK.encode(target))
    canvas = torch.tensor([prompt + [TOK.mask_id] * N] * B)
    return denoise(fixed_model(target, P), canvas, P, steps, block_length, LLaDASampler(TOK.mask_id),
                   callback=callback)


def page_data(page: str) -> dict:
    m = re.search(r'<script id="trajectory-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


# ----- token text ---------------------------------------------------------------------------------------------

def test_control_characters_become_visible():
    assert visible("a\x1b[31mb\r\n\t\x7f\x9b") == "a\u241b[31mb\u240d\n\t\u2421\ufffd"


def test_multibyte_characters_are_grouped_once_complete():
    texts = TokenTexts(TOK)
    e_acute = TOK.encode("é")  # two bytes
    assert texts.row([104] + e_acute + [TOK.mask_id]) == ["h", "é", "", MASK_GLYPH]
    assert texts.row([e_acute[0], TOK.mask_id]) == ["\ufffd", MASK_GLYPH], "half a character stays U+FFFD"
    assert texts.row(TOK.encode("✓")) == ["✓", "", ""]
    assert texts.row([TOK.eos_id, TOK.pad_id]) == ["␄", "·"]


# ----- Trajectory ---------------------------------------------------------------------------------------------

def test_trajectory_records_every_step():
    traj = Trajectory()
    out = run("hello world!", steps=6, callback=traj, block_length=6)
    assert len(traj) == 6 and [s.step for s in traj.steps] == list(range(6))
    assert [s.block for s in traj.steps] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(traj.final, out)
    assert sum(int(s.committed.sum()) for s in traj.steps) == 12
    s = traj.steps[0]
    assert torch.isfinite(s.confidence[s.committed]).all() and torch.isnan(s.confidence[~s.committed]).all()


def test_to_json_all_rows_and_one_row():
    traj = Trajectory()
    run("abcd", steps=2, callback=traj, B=2)
    d = json.loads(json.dumps(traj.to_json(), allow_nan=False))
    assert d["num_steps"] == 2 and d["shape"] == [2, 8]
    first = d["steps"][0]
    assert len(first["xt"]) == 2 and first["committed"][0] == [6, 7] and len(first["confidence"][0]) == 2
    one = traj.to_json(row=1)["steps"][1]
    assert one["xt"] == TOK.encode("Say:abcd") and one["committed"] == [4, 5]


def test_html_is_self_contained_animates_and_shows_the_final_text(tmp_path):
    target = "to be </script><b>bold</b> & not"
    traj = Trajectory()
    run(target, steps=8, callback=traj)
    path = traj.save_html(tmp_path / "t.html", TOK, prompt_len=len(PROMPT))
    page = path.read_text(encoding="utf-8")
    assert html.escape(PROMPT + target) in page, "the final text is on the page"
    assert "http://" not in page and "https://" not in page, "no external reference"
    assert page.count("</script>") == 2 and "<b>" not in page, "token text cannot close the script or add tags"
    assert "<style>" in page and 'id="play"' in page and 'type="range"' in page

    data = page_data(page)
    assert data["final"] == target and data["prompt"] == PROMPT
    assert len(data["frames"]) == 8 and data["init"] == [TOK.mask_id] * len(target)
    # Replaying the frames as the page's script does rebuilds the final canvas.
    ids = list(data["init"])
    for frame in data["frames"]:
        for pos, i in frame["set"]:
            ids[pos] = i
        assert all(0 <= c <= 1 for _, c in frame["commit"])
    assert "".join(data["vocab"][str(i)] for i in ids) == target


def test_html_groups_multibyte_text(tmp_path):
    traj = Trajectory()
    run("café ✓", steps=4, callback=traj)
    data = page_data(traj.save_html(tmp_path / "u.html", TOK, prompt_len=len(PROMPT)).read_text(encoding="utf-8"))
    assert data["final"] == "café ✓"
    last = dict(map(tuple, data["frames"][-1]["text"]))
    assert last[3] == "é" and last[4] == "" and last[6] == "✓"


def test_empty_trajectory_errors():
    with pytest.raises(ValueError, match="trajectory is empty: pass it as `callback=`"):
        Trajectory().save_html("never.html", TOK, 0)


# ----- LiveCanvas -----------------------------------------------------------------------------------------------

def test_live_canvas_in_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, color_system="standard")
    with LiveCanvas(TOK, prompt_len=len(PROMPT), total_steps=4, console=console, refresh_per_second=0) as live:
        run("hello there", steps=4, callback=live)
    out = buf.getvalue()
    assert "\x1b[" in out and "step 4/4" in out
    assert "hello there" in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.split("step 4/4")[-1])


def test_live_canvas_not_a_terminal_prints_one_plain_line_at_the_end():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=60)
    live = LiveCanvas(TOK, prompt_len=len(PROMPT), console=console)
    run("esc \x1b[31m red", steps=3, callback=live)  # starts itself on the first event
    assert buf.getvalue() == "", "nothing per step"
    live.stop()
    out = buf.getvalue()
    assert "\x1b" not in out, "no ANSI codes and no raw escape from the text"
    assert out == "step 3 · block 1: esc \u241b[31m red\n"
    live.stop()  # idempotent
    assert buf.getvalue() == out


def test_live_canvas_draws_on_stderr_by_default():
    assert LiveCanvas(TOK, 3).console.stderr


def test_live_canvas_render_marks_masks_and_fresh_commits():
    frames = []
    run("abcd", steps=2, callback=frames.append)
    live = LiveCanvas(TOK, prompt_len=len(PROMPT), console=Console(file=io.StringIO()))
    text = live.render(frames[0])
    assert text.plain == f"step 1 · block 1 · 2 masked\n{MASK_GLYPH * 2}cd"
    styles = {text.plain[s.start: s.end]: str(s.style) for s in text.spans}
    assert styles[MASK_GLYPH] == "dim" and "yellow" in styles["c"]
