"""Reading the small files of a model or run folder safely: regular files only, with a size cap, as UTF-8.

A `config.json` or `tokenizer.json` can be a symlink to /dev/zero or /dev/urandom (read until memory runs out) or a
FIFO (a read that never returns). `read_text_file` opens without blocking, checks what it opened, and reads at most
`limit` bytes; every failure is one error that names the file. `read_jsonl` is the one JSON Lines reader (corpora,
`dlm judge --input`, `dlm augment`): a bad line is one error naming the file and the line. A leaf module: it imports
nothing of dlm.

    text = read_text_file(folder / "config.json", error=CheckpointError)
    records = read_jsonl("in.jsonl", fields=("text",), expect='a JSON object with a string "text" field')
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

METADATA_LIMIT = 256 << 20  # config, tokenizer and index files; the largest real tokenizer.json is about 35 MB


def check_regular_file(path: str | Path, limit: int | None = METADATA_LIMIT,
                       error: type[Exception] = ValueError) -> int:
    """The size of `path` (symlinks followed), or `error` when it is missing, not a regular file, or over `limit`."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    return _check_stat(path, st, limit, error)


def _check_stat(path: str | Path, st: os.stat_result, limit: int | None, error: type[Exception]) -> int:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a plain file")
        raise error(f"{path} is {kind}, not a regular file; dlm reads only regular files")
    if limit is not None and st.st_size > limit:
        raise error(f"{path} is {st.st_size:,} bytes, over the {limit:,}-byte limit of this file")
    return st.st_size


def read_bytes_file(path: str | Path, limit: int = METADATA_LIMIT, error: type[Exception] = ValueError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (opened without blocking, so a FIFO cannot hang it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        _check_stat(path, os.fstat(fd), limit, error)  # what was opened, not what the name pointed at before
        chunks, total = [], 0
        try:
            while total <= limit and (chunk := f.read(min(1 << 24, limit + 1 - total))):
                chunks.append(chunk)
                total += len(chunk)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror or e}") from e
    if total > limit:  # the file grew after the check
        raise error(f"{path} is over the {limit:,}-byte limit of this file")
    return b"".join(chunks)


def read_text_file(path: str | Path, limit: int = METADATA_LIMIT, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; `error` (naming the file) otherwise."""
    data = read_bytes_file(path, limit, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); is it the right "
                    "file?") from e


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), expect: str = "a JSON object",
               error: type[Exception] = ValueError) -> list[tuple[int, Any]]:
    """The records of a JSON Lines file as (line number from 1, value), blank lines skipped; every line is checked
    before any is used. With `fields`, each record must be an object whose `fields` are strings. A failure is one
    `error` line naming the file and the line, and saying what a line should be (`expect`)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}, line {n}: not JSON ({e.msg}, column {e.colno}); expected {expect}") from e
        except RecursionError as e:  # json.loads gives up on nesting about 1,000 deep
            raise error(f"{path}, line {n}: nests too deeply to be parsed; expected {expect}") from e
        if fields and not (isinstance(rec, dict) and all(isinstance(rec.get(f), str) for f in fields)):
            raise error(f"{path}, line {n}: expected {expect}")
        out.append((n, rec))
    return out


# ----- atomic writes: a reader never sees a half-written file (write a temporary beside it, fsync, rename) -----
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(save_fn, path: Path) -> None:
    """Call save_fn(tmp_path) then rename tmp_path to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
