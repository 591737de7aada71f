"""Tokenizers with the four specials a DLM needs: [PAD], [MASK], [EOS], [BOS].

`ByteTokenizer` maps UTF-8 bytes to ids 0..255 (any text round-trips exactly) and puts the specials after them.
`BPETokenizer` wraps a byte-level BPE from the `tokenizers` library, trainable on local text in seconds.
Both save to / load from a `tokenizer.json` beside the weights.

    tok = ByteTokenizer(); ids = tok.encode("ROMEO:"); tok.decode(ids); tok.mask_id
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SPECIALS = ("[PAD]", "[MASK]", "[EOS]", "[BOS]")


class Tokenizer:
    """Interface: encode text to ids, decode ids to text, and the special ids."""

    vocab_size: int
    pad_id: int
    mask_id: int
    eos_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_id, self.mask_id, self.eos_id, self.bos_id}

    def save(self, path: str | Path) -> None:
        from dlm.checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json()) + "\n")

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a dlm tokenizer: expected a JSON object")
        kind = d.get("dlm_tokenizer")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BPETokenizer.from_json(d)
        raise ValueError(f"{path} is not a dlm tokenizer (dlm_tokenizer={kind!r}); expected 'byte' or 'bpe'")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; [PAD]=256, [MASK]=257, [EOS]=258, [BOS]=259."""

    def __init__(self) -> None:
        self.pad_id, self.mask_id, self.eos_id, self.bos_id = 256, 257, 258, 259
        self.vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = bytearray()
        names = dict(zip((self.pad_id, self.mask_id, self.eos_id, self.bos_id), SPECIALS, strict=True))
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special and i in names:
                out += names[i].encode()
        # A sampled byte sequence need not be valid UTF-8: keep what is valid, mark the rest.
        return out.decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"dlm_tokenizer": "byte", "specials": list(SPECIALS)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library; round-trips any text."""

    def __init__(self, hf_tokenizer: Any) -> None:
        # "[MASK]" typed in a text is text: only the pipeline turns gaps into mask ids.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        ids = [hf_tokenizer.token_to_id(s) for s in SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(f"BPE tokenizer lacks one of the specials {SPECIALS}")
        self.pad_id, self.mask_id, self.eos_id, self.bos_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str] | Iterable[str], vocab_size: int = 2048) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text stay plain text here; gaps are parsed by the pipeline.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def to_json(self) -> dict[str, Any]:
        return {"dlm_tokenizer": "bpe", "hf": json.loads(self._tok.to_str())}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(json.dumps(d["hf"])))
        except Exception as e:  # KeyError, TypeError, or the tokenizers library's own exception type
            raise ValueError(f"the BPE tokenizer file is malformed: {e}") from e


def build_tokenizer(spec: str, train_texts: Iterable[str] | None = None) -> Tokenizer:
    """`byte` or `bpe:<vocab>` (trained on `train_texts`)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe"):
        _, _, size = spec.partition(":")
        if train_texts is None:
            raise ValueError("a BPE tokenizer needs training text")
        try:
            vocab = int(size or 2048)
        except ValueError as e:
            raise ValueError(f"tokenizer {spec!r}: write bpe:<vocab size>, e.g. bpe:2048") from e
        return BPETokenizer.train(train_texts, vocab_size=vocab)
    raise ValueError(f"unknown tokenizer {spec!r}; use 'byte' or 'bpe:<vocab size>'")
