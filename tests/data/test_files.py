"""User data files: every format, every field-name variant, and an error for each kind of bad input."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from iapt.data import DataError, Example, load_examples


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_instruction_input_output(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"},
        ],
    )
    assert load_examples(path) == [
        Example("Translate to French.\n\ncat", "chat"),
        Example("Say hi.", "hi"),
        Example("Say bye.", "bye"),
    ]


@pytest.mark.parametrize("answer_field", ["response", "completion"])
def test_jsonl_prompt_response_or_completion(tmp_path: Path, answer_field: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", answer_field: "4"}])
    [ex] = load_examples(path)
    assert (ex.prompt, ex.response, ex.references) == ("2+2?", "4", ("4",))


def test_messages_keep_roles_and_last_assistant_is_response(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    [ex] = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))
    assert ex.prompt == messages[:-1]
    assert ex.response == "Blue."


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"instruction": "c", "output": "d"}]))
    assert [(e.prompt, e.response) for e in load_examples(path)] == [("a", "b"), ("c", "d")]


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert len(load_examples(path)) == 2


def test_csv_with_all_shapes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Sum these.", "1, 2", "3"])
        writer.writerow(["Say\nhello.", "", "hello"])  # a quoted multi-line cell
    assert load_examples(path) == [Example("Sum these.\n\n1, 2", "3"), Example("Say\nhello.", "hello")]


def test_csv_messages_column_is_json(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(messages)]])
    [ex] = load_examples(path)
    assert ex.prompt == messages[:1] and ex.response == "Hello"


# --- errors ----------------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: invalid JSON"):
        load_examples(path)


def test_missing_fields_lists_expected_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"line 2: missing fields; expected 'instruction' and 'output'.*'messages'"
    ) as err:
        load_examples(path)
    assert "answer" in str(err.value) and "question" in str(err.value)  # what the row did have


def test_instruction_without_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"line 1: missing field 'output'"):
        load_examples(path)


def test_prompt_without_answer_mentions_completion(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing field 'completion'.*'response'"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}]))


@pytest.mark.parametrize("row", [{"prompt": "a", "response": "  "}, {"instruction": "a", "output": ""}])
def test_empty_response(tmp_path: Path, row: dict) -> None:
    with pytest.raises(DataError, match=r"line 1: empty response"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"item 1: field 'output' must be a string, got int"):
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"instruction": "a", "output": 3}]))
        load_examples(path)


def test_row_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 1: expected an object.*got list"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [["a", "b"]]))


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "user", "content": "Hi"}], "last message must be the assistant"),
        ([{"role": "assistant", "content": "Hi"}], "no prompt before it"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], "empty response"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 1 must be an object"),
        ([], "non-empty list"),
    ],
)
def test_bad_messages(tmp_path: Path, messages: list, problem: str) -> None:
    with pytest.raises(DataError, match=problem):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))


def test_csv_error_reports_the_rows_first_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\n"multi\nline",ok\nsecond,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv, line 4: empty response"):
        load_examples(path)


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: missing field 'output'"):
        load_examples(path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("d.jsonl", ""),
        ("d.jsonl", "\n\n"),
        ("d.json", ""),
        ("d.json", "[]"),
        ("d.csv", ""),
        ("d.csv", "prompt,response\n"),
    ],
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"contains no examples"):
        load_examples(path)


def test_json_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "a", "response": "b"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_examples(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'.*\.jsonl, \.json, \.csv"):
        load_examples(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_dataset_dir_without_datasets_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples(tmp_path)


def test_saved_dataset(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == [Example("a", "b")]
    assert load_examples(tmp_path / "dd", split="test") == [Example("a", "b")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_binary_line_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    good = {
        ".jsonl": b'{"prompt": "a", "response": "b"}\n',
        ".json": b'[{"prompt": "a", "response": "b"},\n',
        ".csv": b"prompt,response\n",
    }[suffix]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(good + b'{"prompt": "caf\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"data\{suffix}, line 2: not UTF-8 text \(byte 0xff at column 16\)"):
        load_examples(path)
