"""Every record is checked, and every problem names the file and the record."""

from __future__ import annotations

import json

import pytest

from adl_llm.data import few_shot_examples, load_records
from adl_llm.errors import DataError
from tests.conftest import EVAL_FILE, TRAIN_FILE


def _write(tmp_path, content, name="data.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return str(path)


GOOD = {"id": "a", "instruction": "翻譯：天", "output": "天空"}


@pytest.mark.parametrize(
    "content,needle",
    [
        ('[{"id": "a", "instruction": ', "is not valid JSON"),
        ("", "the file is empty"),
        ({"id": "a"}, "expected a JSON list of records, found a JSON dict"),
        ([], "holds no records"),
        ([GOOD, "text"], "record 1: expected an object"),
        ([GOOD, {"id": "b", "output": "x"}], "record 1: missing field 'instruction'"),
        ([{"id": 7, "instruction": "x", "output": "y"}], "record 0: field 'id' must be a string, found int"),
        (
            [GOOD, {"id": "b", "instruction": ["x"], "output": "y"}],
            "record 1: field 'instruction' must be a string",
        ),
        ([GOOD, {"id": "b", "instruction": "  ", "output": "y"}], "record 1: empty instruction"),
        ([GOOD, {**GOOD, "instruction": "另一句"}], "record 1: duplicate id 'a' (first at record 0)"),
        ([GOOD, {"id": "b", "instruction": "x"}], "record 1: missing field 'output'"),
        ([{**GOOD, "output": 3}], "record 0: field 'output' must be a string"),
    ],
)
def test_bad_files_name_the_file_and_record(tmp_path, content, needle):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as info:
        load_records(path, need_outputs=True)
    assert str(info.value).startswith(path)
    assert needle in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_records(str(tmp_path / "nope.json"), need_outputs=True)


def test_file_without_outputs_is_for_generation_only(tmp_path):
    path = _write(tmp_path, [{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "y"}])
    records = load_records(path, need_outputs=False)
    assert [r.output for r in records] == [None, None]
    with pytest.raises(DataError, match="record 0: missing field 'output'"):
        load_records(path, need_outputs=True)


def test_first_n_and_jsonl(tmp_path):
    rows = [{"id": str(i), "instruction": f"句{i}", "output": "答"} for i in range(5)]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n", name="data.jsonl")
    assert [r.id for r in load_records(path, need_outputs=True, limit=3)] == ["0", "1", "2"]
    bad = _write(tmp_path, json.dumps(rows[0]) + "\n{oops\n", name="bad.jsonl")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_records(bad, need_outputs=True)


def test_the_whole_file_is_checked_even_when_only_the_first_n_are_kept(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD])
    with pytest.raises(DataError, match="duplicate id"):
        load_records(path, need_outputs=True, limit=1)


def test_few_shot_examples_are_the_last_training_records():
    train = load_records(str(TRAIN_FILE), need_outputs=True)
    assert few_shot_examples(train, 3) == train[-3:]
    with pytest.raises(DataError, match=r"prompt\.n_shots=41"):
        few_shot_examples(train, 41)


def test_shipped_data_is_valid():
    from adl_llm.config import PROJECT_ROOT

    data = PROJECT_ROOT / "data" / "classical_zh"
    assert len(load_records(str(data / "train.json"), need_outputs=True)) == 10_000
    assert len(load_records(str(data / "public_test.json"), need_outputs=True)) == 250
    assert len(load_records(str(EVAL_FILE), need_outputs=True)) == 12
