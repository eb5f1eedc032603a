"""Loading and validating records: every format, column mapping, every bad-input case, the real Dolly file."""

import json
from pathlib import Path

import pandas as pd
import pytest

from mixroute.data import DataError, Record, load_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
DOLLY = Path("/work/shared/data/dolly-15k/databricks-dolly-15k.jsonl")

ROWS = [
    {"instruction": "Add 1 and 2.", "context": "", "response": "3", "category": "math"},
    {"instruction": "Who wrote it?", "context": "Ada wrote the note.", "response": "Ada", "category": "qa"},
    {"instruction": "Add 2 and 2.", "context": "", "response": "4", "category": "math"},
]
EXPECTED = [Record(**r) for r in ROWS]


def write(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_every_file_format_loads_the_same_records(tmp_path, name):
    rs = load_records(write(tmp_path, name, ROWS))
    assert rs.records == EXPECTED
    assert rs.loaded == 3 and rs.skipped == 0
    assert rs.categories == ["math", "qa"]
    assert rs.counts() == {"math": 2, "qa": 1}


def test_dataset_and_list_of_dicts_load(tmp_path):
    import datasets

    assert load_records(datasets.Dataset.from_list(ROWS)).records == EXPECTED
    assert load_records(ROWS).records == EXPECTED
    assert load_records(EXPECTED).records == EXPECTED  # Records pass through


def test_context_is_optional_and_record_reads_like_a_dict(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "context"} for r in ROWS]
    rs = load_records(write(tmp_path, "d.jsonl", rows))
    assert [r.context for r in rs] == ["", "", ""]
    rec = rs[1]
    assert rec["response"] == "Ada" and rec.get("instruction") == "Who wrote it?" and rec.get("nope", 7) == 7


def test_null_context_in_parquet_is_empty(tmp_path):
    rows = [dict(ROWS[0], context=None), ROWS[1]]
    rs = load_records(write(tmp_path, "d.parquet", rows))
    assert rs[0].context == "" and rs[1].context == "Ada wrote the note."


def test_column_mapping_csv_fixture():
    cols = {"instruction": "prompt", "context": "input", "response": "completion", "category": "task"}
    rs = load_records(FIXTURES / "mini_mapped.csv", columns=cols)
    assert len(rs) == 4
    assert rs.counts() == {"math": 2, "summary": 1, "translate": 1}
    assert rs[2].instruction == 'Summarise: "the cat sat on the mat"' and rs[2].context == ""
    assert rs[0].response == "4"  # CSV cells stay strings


def test_column_mapping_jsonl(tmp_path):
    rows = [{"prompt": r["instruction"], "completion": r["response"], "task": r["category"]} for r in ROWS]
    rs = load_records(write(tmp_path, "m.jsonl", rows),
                      columns={"instruction": "prompt", "response": "completion", "category": "task"})
    assert [(r.instruction, r.response, r.category) for r in rs] == \
        [(r.instruction, r.response, r.category) for r in EXPECTED]


def test_unknown_field_in_column_mapping():
    with pytest.raises(DataError, match=r"unknown field\(s\) 'prompt'.*instruction, context, response, category"):
        load_records(ROWS, columns={"prompt": "instruction"})


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "response": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}:3:" in str(e.value) and "malformed JSON" in str(e.value)


def test_malformed_json_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "x",\n "response": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_records(path)


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(path)


def test_missing_fields_listed_with_found_fields(tmp_path):
    path = write(tmp_path, "m.jsonl", [ROWS[0], {"instruction": "x", "answer": "y"}])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg
    assert "missing field(s) 'response', 'category'" in msg
    assert "found fields: 'instruction', 'answer'" in msg


def test_missing_mapped_field_names_both_names(tmp_path):
    path = write(tmp_path, "m.csv", [{"prompt": "a", "output": "b", "task": "t"}])
    with pytest.raises(DataError) as e:
        load_records(path, columns={"instruction": "prompt", "response": "completion", "category": "task"})
    assert "'completion' (for response)" in str(e.value) and "line 2" in str(e.value)
    assert "'output'" in str(e.value)


def test_non_string_field_names_file_line_field_and_type(tmp_path):
    path = write(tmp_path, "n.jsonl", [ROWS[0], dict(ROWS[1], response=42)])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and "'response'" in msg and "found int" in msg


def test_non_string_in_parquet_names_row(tmp_path):
    path = write(tmp_path, "n.parquet", [dict(r, response=i) for i, r in enumerate(ROWS)])
    with pytest.raises(DataError, match=rf"{path} row 0: field 'response' must be a string, found int"):
        load_records(path)


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}:1: expected an object.*found list"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_data_set(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match="no records"):
        load_records(path)


def test_category_filter_matching_nothing_lists_categories():
    with pytest.raises(DataError) as e:
        load_records(ROWS, categories=["poetry"])
    msg = str(e.value)
    assert "'poetry'" in msg and "math (2)" in msg and "qa (1)" in msg


def test_empty_category_filter_lists_categories():
    with pytest.raises(DataError, match=r"category filter is empty.*math \(2\), qa \(1\)"):
        load_records(ROWS, categories=[])


def test_bom_and_bad_encoding(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        load_records(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert load_records(path).records == EXPECTED[:1]


def test_category_filter_counts_filtered():
    rs = load_records(ROWS, categories=["qa"])
    assert [r.category for r in rs] == ["qa"] and rs.filtered == 2 and rs.loaded == 3


def test_blank_records_are_skipped_and_counted():
    rows = ROWS + [dict(ROWS[0], response="  "), dict(ROWS[0], instruction="")]
    rs = load_records(rows)
    assert len(rs) == 3 and rs.loaded == 5 and rs.skipped == 2
    assert rs.skipped_where == ["records item 3", "records item 4"]


def test_max_per_category_is_seeded_and_counted():
    rows = [dict(ROWS[0], instruction=f"Add {i} and 1.", response=str(i + 1)) for i in range(20)] + [ROWS[1]]
    a = load_records(rows, max_per_category=5, seed=1)
    b = load_records(list(reversed(rows)), max_per_category=5, seed=1)
    c = load_records(rows, max_per_category=5, seed=2)
    assert a.counts() == {"math": 5, "qa": 1} and a.capped == 15
    assert sorted(a.records, key=str) == sorted(b.records, key=str)  # independent of input order
    assert set(a.records) != set(c.records)


def test_unsupported_file_type_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'.*\.jsonl"):
        load_records(tmp_path / "d.txt")
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "missing.jsonl")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_fixture_file_loads():
    rs = load_records(FIXTURES / "mini.jsonl")
    assert len(rs) == 12 and rs.counts() == {"brainstorming": 4, "classification": 4, "closed_qa": 4}


def test_dolly_15k_loads():
    if not DOLLY.is_file():
        pytest.skip(f"Dolly-15k not found at {DOLLY}")
    rs = load_records(DOLLY)
    assert len(rs) == 15011 and rs.skipped == 0
    assert rs.counts() == {"brainstorming": 1766, "classification": 2136, "closed_qa": 1773,
                           "creative_writing": 709, "general_qa": 2191, "information_extraction": 1506,
                           "open_qa": 3742, "summarization": 1188}
