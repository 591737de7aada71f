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

from dlm.errors import TokenizerMissingError  # noqa: F401  (re-exported)
from dlm.io import atomic_write_text

SPECIALS = ("[PAD]", "[MASK]", "[EOS]", "[BOS]")


ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat(messages: Iterable[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The chat format of a model without a template: `Role: content` per line, then `Assistant: ` for the answer
    to follow. `dlm sft` trains on it, and `DiffusionLM.chat` and the server render with it."""
    text = "".join(f"{ROLES.get(m['role'], m['role'].title())}: {m['content']}\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def as_tensors(ids: list[int], return_tensors: str | None) -> Any:
    """ids as a list (None) or, with return_tensors="pt" as in Hugging Face, a LongTensor (1, L)."""
    if return_tensors is None:
        return ids
    if return_tensors != "pt":
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' (a LongTensor (1, L)) or None")
    import torch

    return torch.tensor([ids], dtype=torch.long)


class Tokenizer:
    """Interface: encode text to ids, decode ids to text, and the special ids."""

    vocab_size: int
    pad_id: int
    mask_id: int
    eos_id: int
    bos_id: int

    def encode(self, text: str, return_tensors: str | None = None) -> Any:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_id, self.mask_id, self.eos_id, self.bos_id}

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end an answer (EOS; chat models add their end-of-turn token)."""
        return {self.eos_id}

    has_chat_template = False

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text (special tokens written out; `encode` reads them back).

        Without a template of its own: `plain_chat`, the one format `dlm sft` trains, the server and chat use."""
        return plain_chat(messages, add_generation_prompt)

    def save(self, path: str | Path) -> None:
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

    def encode(self, text: str, return_tensors: str | None = None) -> Any:
        try:
            return as_tensors(list(text.encode("utf-8")), return_tensors)
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid Unicode: {e.reason} at character {e.start} "
                             "(a lone surrogate escape such as \\ud800)") from None

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

    def encode(self, text: str, return_tensors: str | None = None) -> Any:
        # Special tokens written in the text stay plain text here; gaps are parsed by the pipeline.
        return as_tensors(self._tok.encode(text, add_special_tokens=False).ids, return_tensors)

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


class HFTokenizer(Tokenizer):
    """A Hugging Face `transformers` tokenizer of a pretrained model (LLaDA, Dream), with its chat template.

    The special ids come from the model's config.json (mask_token_id is not a standard tokenizer field).
    """

    def __init__(self, hf_tokenizer: Any, mask_id: int, eos_id: int, pad_id: int | None = None,
                 bos_id: int | None = None, stop_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
        self._tok = hf_tokenizer
        self.mask_id, self.eos_id = int(mask_id), int(eos_id)
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        bos = bos_id if bos_id is not None else hf_tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else self.eos_id
        self.vocab_size = int(vocab_size) if vocab_size is not None else len(hf_tokenizer)
        self._stop = {self.eos_id, *(int(i) for i in stop_ids)}

    @property
    def stop_ids(self) -> set[int]:
        return set(self._stop)

    @property
    def hf(self) -> Any:
        return self._tok

    def encode(self, text: str, return_tensors: str | None = None) -> Any:
        # Special tokens written in the text (a chat template's headers) become their ids, as upstream.
        return as_tensors(list(self._tok.encode(text, add_special_tokens=False)), return_tensors)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            return super().apply_chat_template(messages, add_generation_prompt)
        return self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError("an HF tokenizer is saved with save(folder), in its own files")

    def save(self, path: str | Path) -> None:
        """Write the tokenizer's own files (tokenizer.json, tokenizer_config.json, ...) into the folder of path."""
        self._tok.save_pretrained(str(Path(path).parent))




class IdsOnlyTokenizer(Tokenizer):
    """The special ids of a folder that ships weights and config but no tokenizer files.

    Token-id calls (`lm.logits(ids)`, `lm.generate(ids)`) need only these ids; every text call raises a one-line
    `TokenizerMissingError` that says how to supply a tokenizer.
    """

    def __init__(self, source: str, vocab_size: int, mask_id: int, eos_id: int, pad_id: int | None = None,
                 bos_id: int | None = None, stop_ids: Iterable[int] = (), hint: str = "") -> None:
        self.source, self.hint = source, hint
        self.vocab_size, self.mask_id, self.eos_id = int(vocab_size), int(mask_id), int(eos_id)
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        self.bos_id = int(bos_id) if bos_id is not None else self.eos_id
        self._stop = {self.eos_id, *(int(i) for i in stop_ids)}

    @property
    def stop_ids(self) -> set[int]:
        return set(self._stop)

    def _missing(self) -> TokenizerMissingError:
        return TokenizerMissingError(
            f"{self.source} has no tokenizer files, so text cannot be encoded or decoded: pass tokenizer= to "
            "DiffusionLM.from_pretrained (a tokenizer folder or tokenizer.json, a transformers tokenizer or a dlm "
            f"Tokenizer) or copy the tokenizer files into the folder{self.hint}; token-id calls work without one")

    def encode(self, text: str, return_tensors: str | None = None) -> Any:
        raise self._missing()

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        raise self._missing()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise self._missing()

    def to_json(self) -> dict[str, Any]:
        raise self._missing()

    def save(self, path: str | Path) -> None:
        """Nothing to write: the folder it is saved into gets no tokenizer files either."""


def missing_tokenizer(folder: Path, **ids: Any) -> IdsOnlyTokenizer:
    """Warn once that `folder` has no tokenizer files and return the ids-only stand-in."""
    import warnings

    warnings.warn(f"{folder} has no tokenizer files: loaded for token-id calls only (pass tokenizer= to "
                  "from_pretrained for text)", stacklevel=4)
    return IdsOnlyTokenizer(str(folder), **ids)


def tokenizer_like(spec: Any, model_tok: Tokenizer) -> Tokenizer:
    """A user-supplied tokenizer for a loaded model: a dlm Tokenizer as it is; a path to a dlm tokenizer.json;
    a folder of Hugging Face tokenizer files or a transformers tokenizer, given the model's special ids."""
    path = Path(spec).expanduser() if isinstance(spec, (str, Path)) else None
    if isinstance(spec, Tokenizer) or (path is not None and path.is_file()):
        tok = spec if isinstance(spec, Tokenizer) else Tokenizer.load(path)
    else:
        hf = spec
        if path is not None:
            if not path.is_dir():
                raise ValueError(f"tokenizer={str(spec)!r} is neither a tokenizer.json file nor a folder")
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
        if not hasattr(hf, "encode") or not hasattr(hf, "decode"):
            raise ValueError("tokenizer= must be a dlm Tokenizer, a transformers tokenizer, or a path to one")
        tok = HFTokenizer(hf, mask_id=model_tok.mask_id, eos_id=model_tok.eos_id, pad_id=model_tok.pad_id,
                          bos_id=model_tok.bos_id, stop_ids=model_tok.stop_ids, vocab_size=model_tok.vocab_size)
    if tok.vocab_size > model_tok.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {model_tok.vocab_size}")
    return tok


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
