"""Load a user's instruction/response pairs from JSONL, JSON, CSV or a saved ``datasets`` dataset.

Accepted row shapes (checked in this order, the first that matches wins):

* ``messages``: a list of ``{"role", "content"}``; the last message must be the assistant's
  answer (the response) and everything before it is the prompt, roles kept;
* ``instruction`` + ``output`` (+ optional ``input``, appended to the instruction after a blank line);
* ``prompt`` + ``response`` or ``prompt`` + ``completion``.

A bad row stops loading with a :class:`DataError` naming the file, the line (JSONL/CSV, 1-based)
or item/row number (JSON list, dataset) and the problem, so it can be fixed rather than skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .examples import DataError, Example, Message

EXPECTED_FIELDS = (
    "'instruction' and 'output' (optional 'input'), 'prompt' and 'response' (or 'completion'), or 'messages'"
)
SUFFIXES = (".jsonl", ".json", ".csv")


def load_examples(path: str | Path, *, split: str | None = None) -> list[Example]:
    """Read every row of ``path`` into :class:`Example` objects.

    ``path`` is a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` file, or a directory written
    by ``datasets.Dataset.save_to_disk`` (needs the ``datasets`` package). For a saved
    ``DatasetDict`` pick the split with ``split`` (default: ``train`` if present, else the only one).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        rows = _dataset_rows(path, split)
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)} "
            "or a directory saved with datasets' save_to_disk"
        )
    examples = [parse_row(row, f"{path}, {where}") for where, row in rows]
    if not examples:
        raise DataError(f"{path}: the file contains no examples")
    return examples


def parse_row(row: Any, where: str = "row") -> Example:
    """Turn one record into an :class:`Example`; ``where`` prefixes every error message."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields {EXPECTED_FIELDS}, got {type(row).__name__}")
    if "messages" in row:
        return _parse_messages(row["messages"], where)
    if "instruction" in row or "output" in row:
        instruction = _text(row, "instruction", where, what="'instruction' and 'output'")
        output = _text(row, "output", where, what="'instruction' and 'output'")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return _example(prompt, output, where, "output")
    if "prompt" in row:
        answer_field = "response" if "response" in row else "completion"
        prompt = _text(row, "prompt", where, what="'prompt' and 'response' (or 'completion')")
        answer = _text(row, answer_field, where, what="'prompt' and 'response' (or 'completion')")
        return _example(prompt, answer, where, answer_field)
    raise DataError(f"{where}: missing fields; expected {EXPECTED_FIELDS}; found {sorted(map(str, row))}")


def _text(row: Mapping, name: str, where: str, what: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (expected {what}); found {sorted(map(str, row))}")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _example(prompt: str, response: str, where: str, response_field: str) -> Example:
    if not prompt.strip():
        raise DataError(f"{where}: empty prompt")
    if not response.strip():
        raise DataError(f"{where}: empty response (field {response_field!r})")
    return Example(prompt=prompt, response=response)


def _parse_messages(messages: Any, where: str) -> Example:
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'messages' is not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns: list[Message] = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} 'content' must be a string, got {type(m['content']).__name__}")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's answer (the response); "
            f"it has role {turns[-1]['role']!r}"
        )
    if len(turns) < 2:
        raise DataError(f"{where}: 'messages' has only the assistant's answer; no prompt before it")
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: empty response (the last assistant message)")
    return Example(prompt=turns[:-1], response=turns[-1]["content"])


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1}); save the file as UTF-8"
        ) from None


def _read_text(path: Path) -> str:
    """The whole file as UTF-8; a bad byte is reported with its line, not only its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}, line {lineno}: not UTF-8 text (byte 0x{data[e.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file contains no examples")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json: read it as JSONL
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}, line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield f"item {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        _ = reader.fieldnames  # read the header now, so line_num counts from it
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(f"{path}, line {start}: more values than columns in the header")
            yield f"line {start}", {k: v for k, v in row.items() if v is not None}
            start = reader.line_num + 1


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a directory; reading a saved Hugging Face dataset needs the 'datasets' "
            "package: pip install datasets"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise DataError(f"{path}: choose a split with split=...; available: {', '.join(names)}")
        data = data[chosen]
    elif split is not None:
        raise DataError(f"{path}: a single dataset has no splits; drop split={split!r}")
    for i, row in enumerate(data, 1):
        yield f"row {i}", row
