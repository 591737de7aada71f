"""Watching a canvas resolve: a live terminal view and a recorded trajectory saved as one HTML page.

Both are callbacks of the denoising loop (`denoise(..., callback=...)`, `DiffusionLM.generate(callback=...)`),
taking a `StepEvent` whose `.output` holds the canvas `xt` (B, L), the `committed` (B, L) positions of this step
and their `confidence` (B, L).

    with LiveCanvas(lm.tokenizer, prompt_len) as live:            # a rich.live.Live view of row 0, on stderr
        lm.generate(prompt, callback=live)
    traj = Trajectory(); lm.generate(prompt, callback=traj)
    traj.save_html("run.html", lm.tokenizer, prompt_len)          # self-contained: inline CSS and JS, no URLs

Tokens are decoded one at a time (`tokenizer.decode([id])`). With a byte-level tokenizer a character of several
UTF-8 bytes spans several tokens and each alone decodes to U+FFFD; when a run of up to 4 such tokens is complete
on the canvas it decodes as a group, the text shown on its first position and the others left empty. Control
characters are shown as their Unicode "control pictures" (ESC as U+241B), so token text can never emit terminal
escape sequences; [EOS] / [PAD] / [BOS] are shown as the short markers in `SPECIAL_GLYPHS`.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rich.console import Console

    from dlm.sampling.generate import StepEvent
    from dlm.tokenizer import Tokenizer

MASK_GLYPH = "░"
SPECIAL_GLYPHS = {"eos": "␄", "pad": "·", "bos": "␂"}
_REPLACEMENT = "\ufffd"


# ----- token text -------------------------------------------------------------------------------------------

def visible(text: str) -> str:
    """Control characters (except newline and tab) -> Unicode control pictures; C1 controls -> U+FFFD."""
    out = []
    for ch in text:
        c = ord(ch)
        if c < 0x20 and ch not in "\n\t":
            out.append(chr(0x2400 + c))
        elif c == 0x7F:
            out.append("\u2421")
        elif 0x80 <= c < 0xA0:
            out.append(_REPLACEMENT)
        else:
            out.append(ch)
    return "".join(out)


class TokenTexts:
    """Per-token display text for a tokenizer, cached by id; groups split multi-byte characters (see module doc)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.mask_id = tokenizer.mask_id
        self.specials = {tokenizer.eos_id: SPECIAL_GLYPHS["eos"], tokenizer.pad_id: SPECIAL_GLYPHS["pad"],
                         tokenizer.bos_id: SPECIAL_GLYPHS["bos"], tokenizer.mask_id: MASK_GLYPH}
        self._raw: dict[int, str] = {}

    def raw(self, i: int) -> str:
        if i not in self._raw:
            self._raw[i] = self.specials[i] if i in self.specials else self.tokenizer.decode([i])
        return self._raw[i]

    def text(self, i: int) -> str:
        return visible(self.raw(i))

    def row(self, ids: Sequence[int]) -> list[str]:
        """ids -> one display string per position ("" for the tail of a grouped multi-byte character)."""
        ids = [int(i) for i in ids]
        out = [self.text(i) for i in ids]
        i = 0
        while i < len(ids):
            if ids[i] not in self.specials and _REPLACEMENT in self.raw(ids[i]):
                for w in (2, 3, 4):
                    group = ids[i: i + w]
                    if len(group) < w or any(j in self.specials for j in group):
                        break
                    text = self.tokenizer.decode(group)
                    if _REPLACEMENT not in text:
                        out[i: i + w] = [visible(text)] + [""] * (w - 1)
                        i += w - 1
                        break
            i += 1
        return out


# ----- live terminal view -----------------------------------------------------------------------------------

class LiveCanvas:
    """A `rich.live.Live` view of row `row`'s canvas [prompt_len, end) redrawn at each denoising step.

    It draws on `console`, by default a rich Console on stderr, so stdout stays clean for the generated text.

    Masks are a dim block, tokens committed by the latest step are highlighted, and a header gives the step
    (and block). Use it as a context manager (or call `stop()`); it also starts itself on the first event.

    On a console that is not a terminal (a log file, a pipe, CI) nothing is printed per step: `stop()` prints
    one plain line with the last step number followed by the final text (its own newlines kept), with no styling
    and no ANSI codes.
    Redraws are throttled to `refresh_per_second`; the last state is always drawn on `stop()`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_len: int = 0, end: int | None = None, row: int = 0,
                 total_steps: int | None = None, console: Console | None = None,
                 refresh_per_second: float = 20.0) -> None:
        from rich.console import Console

        self.texts = TokenTexts(tokenizer)
        self.start_pos, self.end_pos, self.row = prompt_len, end, row
        self.total_steps = total_steps
        self.console = console if console is not None else Console(stderr=True)
        self.min_interval = 1.0 / refresh_per_second if refresh_per_second > 0 else 0.0
        self._live: Any = None
        self._last: StepEvent | None = None
        self._last_draw = -math.inf
        self._running = False

    def __enter__(self) -> LiveCanvas:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def interactive(self) -> bool:
        return (self.console.is_terminal and not self.console.is_dumb_terminal) or self.console.is_jupyter

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        if self.interactive:
            from rich.live import Live

            # No refresh thread and no stdout redirection: we draw from the loop, and leave other output alone.
            self._live = Live(console=self.console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def __call__(self, event: StepEvent) -> None:
        if not self._running:
            self.start()
        self._last = event
        now = time.monotonic()
        if self._live is not None and now - self._last_draw >= self.min_interval:
            self._live.update(self.render(event), refresh=True)
            self._last_draw = now

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if self._live is not None:
            if self._last is not None:
                self._live.update(self.render(self._last))
            self._live.stop()  # draws the last update
            self._live = None
        elif self._last is not None:
            from rich.text import Text

            line = f"{self._header(self._last)}: {''.join(self._pieces(self._last)[0])}"
            self.console.print(Text(line), soft_wrap=True, markup=False, highlight=False)

    def _header(self, event: StepEvent) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        return f"step {event.step + 1}{total} · block {event.block + 1}"

    def _pieces(self, event: StepEvent) -> tuple[list[str], list[int], list[bool]]:
        out = event.output
        region = slice(self.start_pos, self.end_pos)
        ids = out.xt[self.row, region].tolist()
        return self.texts.row(ids), ids, out.committed[self.row, region].tolist()

    def render(self, event: StepEvent) -> Any:
        """-> a rich Text: the header line, then the canvas."""
        from rich.text import Text

        pieces, ids, fresh = self._pieces(event)
        n_masked = sum(i == self.texts.mask_id for i in ids)
        text = Text()
        text.append(f"{self._header(event)} · {n_masked} masked\n", style="bold")
        for piece, i, new in zip(pieces, ids, fresh, strict=True):
            if i == self.texts.mask_id:
                text.append(piece, style="dim")
            elif new:
                text.append(piece, style="bold black on yellow")
            elif i in self.texts.specials:
                text.append(piece, style="dim cyan")
            else:
                text.append(piece)
        return text


# ----- recorded trajectory ----------------------------------------------------------------------------------

@dataclass
class TrajectoryStep:
    step: int
    block: int
    xt: torch.Tensor  # (B, L) long, the canvas after this step
    committed: torch.Tensor  # (B, L) bool, positions committed by this step
    confidence: torch.Tensor  # (B, L) float32, the score of each committed token; NaN elsewhere


class Trajectory:
    """Records every denoising step (on the CPU) for replay: `to_json()` for a server, `save_html()` for a page."""

    def __init__(self) -> None:
        self.steps: list[TrajectoryStep] = []

    def __call__(self, event: StepEvent) -> None:
        out = event.output
        committed = out.committed.detach().cpu().bool()
        confidence = torch.where(committed, out.confidence.detach().cpu().float(), torch.nan)
        self.steps.append(TrajectoryStep(event.step, event.block, out.xt.detach().cpu().clone(), committed,
                                         confidence))

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def final(self) -> torch.Tensor:
        """(B, L) the canvas after the last recorded step."""
        if not self.steps:
            raise ValueError("the trajectory is empty: pass it as `callback=` to generate / denoise first")
        return self.steps[-1].xt

    def to_json(self, row: int | None = None) -> dict[str, Any]:
        """JSON-ready dict. Each step: canvas `xt`, `committed` positions and their `confidence` (same order);
        all rows as lists of lists, or one row's flat lists when `row` is given."""
        def one(s: TrajectoryStep, r: int) -> tuple[list[int], list[int], list[float | None]]:
            pos = s.committed[r].nonzero().flatten().tolist()
            return s.xt[r].tolist(), pos, [_finite(s.confidence[r, p].item()) for p in pos]

        steps = []
        for s in self.steps:
            rows = [one(s, r) for r in (range(s.xt.shape[0]) if row is None else [row])]
            fields = [list(col) for col in zip(*rows, strict=True)]
            if row is not None:
                fields = [col[0] for col in fields]
            steps.append({"step": s.step, "block": s.block, "xt": fields[0], "committed": fields[1],
                          "confidence": fields[2]})
        return {"num_steps": len(self.steps), "shape": list(self.final.shape) if self.steps else None,
                "steps": steps}

    def save_html(self, path: str | Path, tokenizer: Tokenizer, prompt_len: int, row: int = 0,
                  title: str = "dlm: denoising trajectory") -> Path:
        """Write one self-contained HTML page (inline CSS and JS, no external URL) animating row `row`.

        The prompt (positions < prompt_len) is shown in grey; the region after it resolves step by step with a
        play/pause button and a step slider; committed tokens are coloured by confidence (red low, green high),
        the latest step's commits are outlined, masks are ░. The final text is also written as plain HTML.
        """
        path = Path(path)
        path.write_text(_render_html(self._page_data(tokenizer, prompt_len, row), title), encoding="utf-8")
        return path

    def _page_data(self, tokenizer: Tokenizer, prompt_len: int, row: int) -> dict[str, Any]:
        if not self.steps:
            raise ValueError("the trajectory is empty: pass it as `callback=` to generate / denoise first")
        texts = TokenTexts(tokenizer)
        first = self.steps[0]
        init = torch.where(first.committed[row], tokenizer.mask_id, first.xt[row])[prompt_len:].tolist()
        canvases = [init] + [s.xt[row, prompt_len:].tolist() for s in self.steps]
        vocab = {i: texts.text(i) for ids in canvases for i in set(ids)}
        frames, prev = [], init
        for s, ids in zip(self.steps, canvases[1:], strict=True):
            pos = s.committed[row, prompt_len:].nonzero().flatten().tolist()
            shown = texts.row(ids)
            frames.append({
                "step": s.step, "block": s.block,
                "set": [[p, i] for p, (i, j) in enumerate(zip(ids, prev, strict=True)) if i != j],
                "commit": [[p, _finite(s.confidence[row, prompt_len + p].item())] for p in pos],
                "text": [[p, t] for p, (t, i) in enumerate(zip(shown, ids, strict=True)) if t != vocab[i]],
            })
            prev = ids
        final = self.steps[-1].xt[row].tolist()
        return {"prompt": visible(tokenizer.decode(final[:prompt_len])), "mask_id": tokenizer.mask_id,
                "specials": sorted(texts.specials), "vocab": {str(k): v for k, v in vocab.items()},
                "init": init, "frames": frames, "final": visible(tokenizer.decode(final[prompt_len:]))}


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no raw <, > or & (so no `</script>` or `<!--`), ASCII only."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _render_html(data: dict[str, Any], title: str) -> str:
    return (_HTML.replace("__TITLE__", html.escape(title))
            .replace("__FINAL__", html.escape(data["prompt"] + data["final"]))
            .replace("__DATA__", _script_json(data)))


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
#canvas, #final { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all;
  line-height: 1.7; padding: 1em; border: 1px solid #ddd; border-radius: 6px; }
#canvas span { border-radius: 2px; }
.given { color: #888; } .mask { color: #bbb; } .special { color: #27a; }
.fresh { outline: 2px solid #222; }
#controls { display: flex; gap: 1em; align-items: center; margin: 1em 0; }
#slider { flex: 1; } button { min-width: 5em; }
.legend span { padding: 0 .4em; margin-right: .5em; }
</style></head>
<body>
<h1>__TITLE__</h1>
<div id="controls"><button id="play">play</button><input id="slider" type="range" min="0" value="0">
<span id="label"></span></div>
<div id="canvas"></div>
<p class="legend"><span class="mask">░ masked</span><span class="fresh">committed this step</span>
<span style="background: hsl(0,75%,85%)">low confidence</span><span style="background: hsl(120,75%,85%)">high</span>
</p>
<h2>Final text</h2>
<pre id="final">__FINAL__</pre>
<script id="trajectory-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("trajectory-data").textContent);
  var canvas = document.getElementById("canvas"), slider = document.getElementById("slider");
  var label = document.getElementById("label"), button = document.getElementById("play");
  var n = D.init.length, last = D.frames.length, timer = null, special = {};
  D.specials.forEach(function (i) { special[i] = true; });
  slider.max = String(last);

  function show(k) {
    var ids = D.init.slice(), conf = new Array(n).fill(null), fresh = {}, text = {};
    for (var f = 0; f < k; f++) {
      var fr = D.frames[f];
      fr.set.forEach(function (pi) { ids[pi[0]] = pi[1]; });
      fr.commit.forEach(function (pc) { conf[pc[0]] = pc[1]; });
    }
    if (k > 0) {
      D.frames[k - 1].commit.forEach(function (pc) { fresh[pc[0]] = true; });
      D.frames[k - 1].text.forEach(function (pt) { text[pt[0]] = pt[1]; });
    }
    canvas.textContent = "";
    var prompt = document.createElement("span");
    prompt.className = "given"; prompt.textContent = D.prompt; canvas.appendChild(prompt);
    for (var p = 0; p < n; p++) {
      var s = document.createElement("span"), id = ids[p];
      s.textContent = (p in text) ? text[p] : D.vocab[String(id)];
      if (id === D.mask_id) { s.className = "mask"; }
      else if (conf[p] !== null) {
        var c = Math.max(0, Math.min(1, conf[p]));
        s.style.background = "hsl(" + Math.round(120 * c) + ",75%,85%)";
        if (special[id]) { s.className = "special"; }
        s.title = "position " + p + ", token " + id + ", confidence " + conf[p].toFixed(3);
      } else { s.className = special[id] ? "special" : "given"; }
      if (fresh[p]) { s.className += " fresh"; }
      canvas.appendChild(s);
    }
    slider.value = String(k);
    label.textContent = k === 0 ? "start" : "step " + (D.frames[k - 1].step + 1) + " (block "
      + (D.frames[k - 1].block + 1) + "), frame " + k + "/" + last;
  }
  function pause() { if (timer !== null) { clearInterval(timer); timer = null; } button.textContent = "play"; }
  function play() {
    if (Number(slider.value) >= last) { show(0); }
    button.textContent = "pause";
    timer = setInterval(function () {
      var k = Number(slider.value) + 1;
      show(k);
      if (k >= last) { pause(); }
    }, Math.max(30, Math.min(400, 8000 / Math.max(1, last))));
  }
  button.addEventListener("click", function () { if (timer === null) { play(); } else { pause(); } });
  slider.addEventListener("input", function () { pause(); show(Number(slider.value)); });
  document.addEventListener("keydown", function (e) {
    if (e.target === slider || e.target === button) { return; }  // they handle their own keys
    if (e.key === " ") { e.preventDefault(); button.click(); }
    if (e.key === "ArrowRight") { pause(); show(Math.min(last, Number(slider.value) + 1)); }
    if (e.key === "ArrowLeft") { pause(); show(Math.max(0, Number(slider.value) - 1)); }
  });
  show(last);
})();
</script>
</body></html>
"""
