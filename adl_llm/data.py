"""Records `{id, instruction, output}`: load, check every one, select the first N, pick few-shot examples.

A file is a JSON list of objects (the course format) or JSON lines (`.jsonl`); `hf:<dataset>[:<split>]`
loads a hub dataset through `datasets`. Every problem is reported with the file and the record index.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adl_llm.config import OTHER_SLICE
from adl_llm.errors import DataError

OFFLINE_FLAGS = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]  # datasets.config's, read from the environment at import

FIELDS = ("id", "instruction", "output")


@dataclass(frozen=True)
class Record:
    id: str
    instruction: str
    output: str | None  # None in a file made for generation only


def load_records(source: str, *, need_outputs: bool, limit: int | None = None) -> list[Record]:
    """Read and check every record of `source`, then keep the first `limit` (all when None).

    `need_outputs` refuses records without a reference `output` (perplexity and training need one).
    """
    rows = _read_rows(source)
    if not rows:
        raise DataError(f"{source}: holds no records")
    records, first_seen = [], {}
    for index, row in enumerate(rows):
        record = _check_record(source, index, row, need_outputs)
        if record.id in first_seen:
            first = first_seen[record.id]
            raise DataError(f"{source}: record {index}: duplicate id {record.id!r} (first at record {first})")
        first_seen[record.id] = index
        records.append(record)
    return records if limit is None else records[:limit]


def slice_names(records: list[Record], rules: dict[str, str]) -> list[str]:
    """Each record's slice: the first rule (a regular expression searched in the instruction) that matches, else
    `other`."""
    compiled = [(name, re.compile(pattern)) for name, pattern in rules.items()]
    return [next((name for name, rule in compiled if rule.search(r.instruction)), OTHER_SLICE) for r in records]


def by_slice(values: list, slices: list[str]) -> dict[str, list]:
    """`values` grouped by their records' slices, in the order the slices first appear."""
    groups: dict[str, list] = {}
    for value, name in zip(values, slices, strict=True):
        groups.setdefault(name, []).append(value)
    return groups


def few_shot_examples(train: list[Record], n_shots: int) -> list[Record]:
    """The seed report's shots: the last `n_shots` records of the whole training file."""
    if n_shots > len(train):
        raise DataError(f"prompt.n_shots={n_shots} but the training file has only {len(train)} records")
    return train[len(train) - n_shots :]


def _read_rows(source: str) -> list[Any]:
    if source.startswith("hf:"):
        return _read_hub_dataset(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: " + ("is a folder, not a data file" if path.is_dir() else "no such data file"))
    text = _read_text(source, path)
    if path.suffix == ".jsonl":
        return [_parse_json(source, line, f"line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    rows = _parse_json(source, text, "the file")
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON list of records, found a JSON {type(rows).__name__}")
    return rows


def _read_text(source: str, path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; anything else is named, not guessed."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{source}: the file is UTF-16; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{source}: not UTF-8 text (byte {err.start}, line {line}); save it as UTF-8") from None


def _parse_json(source: str, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{source}: {where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise DataError(f"{source}: {where} is nested too deeply to be records") from None


def _read_hub_dataset(source: str) -> list[Any]:
    name, _, split = source.removeprefix("hf:").partition(":")
    online = _hub_reachable()
    if not online:  # datasets would retry for half a minute; the local cache answers at once
        _go_offline()
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:
        if not online:
            raise DataError(
                f"{source}: the Hugging Face hub cannot be reached (offline?) and the dataset is not in the local "
                "cache; pass a local .json or .jsonl file"
            ) from None
        raise DataError(f"{source}: cannot load the hub dataset ({type(err).__name__}: {err})") from None


def _go_offline() -> None:
    """Hugging Face's libraries offline from here on: by the environment before they are imported, and by their
    constants where this process has imported them already (they read the environment once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, names in (("huggingface_hub.constants", ["HF_HUB_OFFLINE"]), ("datasets.config", OFFLINE_FLAGS)):
        loaded = sys.modules.get(module)
        for name in names if loaded else []:
            if hasattr(loaded, name):
                setattr(loaded, name, True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _check_record(source: str, index: int, row: Any, need_outputs: bool) -> Record:
    where = f"{source}: record {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}, found {type(row).__name__}")
    for name in FIELDS:
        if name not in row or row[name] is None:
            if name == "output" and not need_outputs:
                continue
            hint = " (perplexity and training need reference outputs)" if name == "output" else ""
            raise DataError(f"{where}: missing field {name!r}{hint}")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, found {type(row[name]).__name__}")
    if not row["instruction"].strip():
        raise DataError(f"{where}: empty instruction")
    return Record(id=row["id"], instruction=row["instruction"], output=row.get("output"))
