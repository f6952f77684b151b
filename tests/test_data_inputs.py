"""Data rows and files rejected at the door (engine/data.py): missing answers, duplicate ids, 0-row and
unreadable files. Each test reproduces a case that misbehaved before: a None answer became the gold string "None" and
a NaN one (a numeric column's missing value) the gold string "nan", a 0-row parquet gave a DatasetGenerationError
traceback and an empty jsonl a bare StopIteration."""
# ruff: noqa: F811 -- the fixtures model_dir and proc come from test_data

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import BadRow, cell_text, encode_rows, load_rows

from .test_data import TEMPLATE, model_dir, proc  # noqa: F401 -- fixtures

# (good answer, missing answer) as one column holds them: a numeric column carries NaN, a text column null or blank.
MISSING = {"none": ("3", None), "nan": (3.0, float("nan")), "blank": ("3", "  ")}


def _prompt_rows(good, missing):
    return datasets.Dataset.from_list([
        {"id": "good", "problem": "What is shown?", "answer": good},
        {"id": "bad", "problem": "What is shown?", "answer": missing},
    ])


@pytest.mark.parametrize("kind", MISSING)
def test_missing_answer_is_a_bad_row(proc, kind):
    rows = _prompt_rows(*MISSING[kind])
    samples, report = encode_rows(rows, proc, template=TEMPLATE, source="data/train.parquet")
    assert [s.row_id for s in samples] == ["good"] and samples[0].answer == str(MISSING[kind][0])
    assert report.by_reason == {"missing answer": 1} and report.row_ids == ["bad"]
    with pytest.raises(BadRow) as e:
        encode_rows(rows, proc, template=TEMPLATE, source="data/train.parquet", on_bad_row="error")
    msg = str(e.value)
    assert "data/train.parquet: row 'bad': missing answer" in msg and "data.on_bad_row = 'skip'" in msg


def test_rows_with_a_response_need_no_answer(proc):
    """SFT and DPO rows train on their response: a missing answer is kept as '' (never the text 'None')."""
    rows = datasets.Dataset.from_list([{"id": "a", "problem": "What?", "answer": None, "response": "The answer is 42"}])
    samples, report = encode_rows(rows, proc, template=TEMPLATE, response_column="response")
    assert report.num_skipped == 0 and samples[0].answer == ""


def test_all_rows_bad_names_the_reason(proc):
    rows = datasets.Dataset.from_list([{"id": "x", "problem": "What?", "answer": None}])
    with pytest.raises(ValueError, match=r"no usable rows \(1 rows, 1 bad: \{'missing answer': 1\}\)"):
        encode_rows(rows, proc, template=TEMPLATE)


def test_cell_text():
    assert [cell_text(v) for v in (None, float("nan"), "", " \n", 3, 2.5, "A")] == [None] * 4 + ["3", "2.5", "A"]


def test_zero_row_files_say_so(tmp_path):
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "zero.parquet")
    (tmp_path / "zero.jsonl").write_text("\n")
    cache = str(tmp_path / "cache")
    for name in ("zero.parquet", "zero.jsonl"):
        with pytest.raises(ValueError, match=rf"zero\.{name.split('.')[1]}'?: 0 rows .*point data.train at"):
            load_rows(tmp_path / name, cache_dir=cache)
    # A directory where only some files are empty loads the rest.
    folder = tmp_path / "parts"
    folder.mkdir()
    (tmp_path / "zero.parquet").rename(folder / "a.parquet")
    pq.write_table(pa.table({"problem": ["p"], "answer": ["1"]}), folder / "b.parquet")
    assert len(load_rows(folder, cache_dir=cache)) == 1


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet'?: not readable as parquet \("):
        load_rows(tmp_path / "bad.parquet", cache_dir=str(tmp_path / "cache"))


def test_duplicate_ids_in_prompt_rows_are_refused(proc):
    """GRPO matched judge questions and per-source metrics to prompts by id: a duplicate silently gave a row
    another row's question. Rows with a response (SFT, DPO) are not matched by id and may repeat one."""
    rows = datasets.Dataset.from_list([{"id": i, "problem": "What?", "answer": "1", "response": "The answer is 42"}
                                       for i in ("a", "b", "a", "", "")])
    with pytest.raises(ValueError, match=r"t.parquet: 1 ids are not unique \('a' at rows \[0, 2\]\);"):
        encode_rows(rows, proc, template=TEMPLATE, source="t.parquet")  # the blank ids number as row-3, row-4
    samples, _ = encode_rows(rows, proc, template=TEMPLATE, response_column="response")
    assert [s.row_id for s in samples] == ["a", "b", "a", "row-3", "row-4"]
