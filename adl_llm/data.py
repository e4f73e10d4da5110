"""Records `{id, instruction, output}`: load, check every one, select the first N, pick few-shot examples.

A file is a JSON list of objects (the course format) or JSON lines (`.jsonl`); `hf:<dataset>[:<split>]`
loads a hub dataset through `datasets`. Every problem is reported with the file and the record index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adl_llm.errors import DataError

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
        raise DataError(f"{source}: no such data file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [_parse_json(source, line, f"line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    rows = _parse_json(source, text, "the file")
    if not isinstance(rows, list):
        raise DataError(f"{source}: expected a JSON list of records, found a JSON {type(rows).__name__}")
    return rows


def _parse_json(source: str, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{source}: {where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None


def _read_hub_dataset(source: str) -> list[Any]:
    import datasets

    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:
        raise DataError(f"{source}: cannot load the hub dataset ({type(err).__name__}: {err})") from None


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
