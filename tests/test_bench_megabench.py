"""MEGA-Bench loader and scorer (engine/benchmarks/megabench.py, megabench_metrics.py).

Expected values of the quirk tests were produced by running the official evaluator (TIGER-AI-Lab/MEGA-Bench
ee324ab, `megabench/metrics/`, with sympy 1.13 + antlr4 4.11) on the same inputs; each comment names the official
rule it checks. The Grok-2-vision responses and the Qwen2-VL-7B per-task scores are the release's own.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from engine.benchmarks import megabench as mb
from engine.benchmarks import megabench_constrained as mcg
from engine.benchmarks import megabench_metrics as mm

from .test_megabench_latex_code_gleu import TIME_12H, needs_sandbox

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks" / "megabench"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "megabench"


def _placeholder(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")


def _hf_dir(tmp_path: Path, with_media: bool = True) -> Path:
    root = tmp_path / "megabench"
    shutil.copytree(FIXTURES / "hf", root)
    for name in ("core.jsonl", "open.jsonl"):
        for line in (root / name).read_text().splitlines():
            row = json.loads(line)
            for key in ("global_media", "example_media", "query_media"):
                for media in ast.literal_eval(row[key]) if with_media else []:
                    _placeholder(root / media.removeprefix("./"))
    return root


def _task_file_dir(tmp_path: Path, task_file: Path, table: Path) -> Path:
    root = tmp_path / "tasks"
    root.mkdir()
    shutil.copy(task_file, root / task_file.name)
    shutil.copy(table, root / table.name)
    for task in json.loads(task_file.read_text())["data"]:
        for query in task["query_response"]:
            for media in query["images"]:
                _placeholder(root / media.removeprefix("./"))
    return root


@pytest.fixture(scope="module")
def hf_rows(tmp_path_factory) -> dict[str, mb.BenchRow]:
    return {row.id: row for row in mb.load(_hf_dir(tmp_path_factory.mktemp("hf")))}


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    task_file = FIXTURES / "task_files" / "data_with_scores_open.slice.json"
    root = _task_file_dir(tmp_path_factory.mktemp("grok"), task_file,
                          FIXTURES / "task_files" / "task_metrics_from_task_examples.json")
    return mb.load(root), json.loads(task_file.read_text())["data"]


# ------------------------------------------------------------------ loading


def test_load_hf_rows(hf_rows):
    assert len(hf_rows) == 30
    row = hf_rows["code_error_line_identification/1"]
    assert row.category == "code_error_line_identification" and row.answer == "7"
    assert row.meta["global_idx"] == "2" and row.meta["query_idx"] == 1 and row.meta["subset"] == "core"
    # Task description, demonstration and query, in the official order; media resolved under the directory.
    assert row.problem.startswith("Given a piece of program code") and "Answer: 16" in row.problem
    assert row.problem.endswith("<image>\nQuestion: Where the error occurs?")
    assert [p.name for p in row.images] == ["01.png", "q2.png"] and all(p.is_file() for p in row.images)
    assert "Think step by step" not in row.problem  # our eval template adds its own instruction
    assert row.meta["field_score_function"] == {"Line": "exact_str_match"} and row.meta["scorable"]
    # Multi-field answers are kept as a dict in meta (BenchRow.answer holds them as JSON).
    multi = hf_rows["stackoverflow_debug_QA/0"]
    assert multi.meta["answer"]["Error line"] == "3" and json.loads(multi.answer) == multi.meta["answer"]


def test_load_media_order_demo_cap_and_video(hf_rows):
    # Official prompt: global media, then demonstration media (at most 4 demo images), then query media.
    row = hf_rows["ocr_table_to_csv/1"]
    assert [p.name for p in row.images] == ["context.png", "d0.png", "d1.png", "d2.png", "d3.png", "t1.png", "t2.png"]
    assert row.problem.count("<image>") == len(row.images) == 7
    video = hf_rows["nextqa_mc/0"]
    assert video.images == [] and video.meta["videos"][0].endswith("q1.mp4") and "<video>" in video.problem


def test_load_flags_unscorable_tasks(hf_rows):
    judged = hf_rows["scibench_w_solution_open_ended/0"]
    assert judged.meta["needs_judge"] and judged.meta["eval_type"] == "llm" and not judged.meta["scorable"]
    assert hf_rows["table2latex_complex/0"].meta["subset"] == "open"
    # constrained_generation needs NLTK's data (tests/test_megabench_constrained.py), present or not here.
    assert (hf_rows["poetry_haiku/0"].meta["unsupported_metrics"] == ["constrained_generation"]) == (
        not mcg.available())
    assert hf_rows["planning_screenshot_barman/0"].meta["scorable"]  # symbolic_planning_test, from the eval_context
    # program_judge runs the response's code: only when the loader is told to.
    assert hf_rows["code_programming_test_easy/0"].meta["unsupported_metrics"] == ["program_judge"]
    with pytest.raises(ValueError, match="run_code"):
        mb.score(hf_rows["code_programming_test_easy/0"], "Answer: print(1)")
    assert hf_rows["worldle/0"].meta["unsupported_metrics"] == ["geo_proximity_location_dict"]  # a global aux metric
    for row_id in ("worldle/0", "scibench_w_solution_open_ended/0"):
        with pytest.raises(ValueError, match="GPT-4o judge|do not implement"):
            mb.score(hf_rows[row_id], "Answer: x")
    # The per-query eval_context comes with each HF row.
    assert hf_rows["GUI_Act_Mobile_tap/0"].meta["eval_context"]["bounding_boxes"][0] == "(0.631, 0.762, 0.744, 0.819)"


def test_load_hf_parquet(tmp_path, hf_rows):
    """The HF release's own files: core/test-*.parquet (the jsonl fixture rewritten as parquet)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    root = _hf_dir(tmp_path)
    for name in ("core", "open"):
        rows = [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
        (root / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / name / "test-00000-of-00001.parquet")
        (root / f"{name}.jsonl").unlink()
    loaded = mb.load(root)
    assert [row.id for row in loaded] == list(hf_rows) and loaded[3].meta == hf_rows[loaded[3].id].meta


def test_load_task_files(grok):
    rows, data = grok
    assert len(rows) == sum(len(task["query_response"]) for task in data) == 48
    assert {row.category for row in rows} == {"ascii_art_30", "table2latex_complex", "scibench_w_solution_open_ended"}
    assert all(row.meta["needs_judge"] and row.meta["eval_type"] == "llm" for row in rows)
    row = next(r for r in rows if r.id == "scibench_w_solution_open_ended/0")
    assert row.meta["response_parse_function"] == "json" and row.meta["answer"]["Answer"] == "0.695635"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*TIGER-Lab/MEGA-Bench"):
        mb.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no MEGA-Bench annotations"):
        mb.load(tmp_path)
    (tmp_path / "t").mkdir()
    shutil.copy(FIXTURES / "task_files" / "data_with_scores_open.slice.json", tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="task_metrics_from_task_examples.json"):
        mb.load(tmp_path / "t")
    root = _hf_dir(tmp_path / "nomedia", with_media=False)
    with pytest.raises(ValueError, match=r"69 media files are missing \(first: .*01.png"):
        mb.load(root)


# ------------------------------------------------------------------ response parsing


@pytest.mark.parametrize("response, single_line, expected", [
    ("Reasoning...\nAnswer: B", True, "B"),
    ("answer: B", True, "B"),  # a lowercase "answer:" counts
    ("Answer: A\nmore thought\nAnswer: C", True, "C"),  # only the last "Answer:" is kept
    ("**Answer: B**", True, "B"),
    ("**Answer:** B", True, ""),  # official quirk: the bold branch matches with an empty group
    ("Answer: B\n\nBecause the figure shows ...", True, "B"),  # first paragraph of a short single-line answer
    ("Answer: B\nBecause ...", True, "B\nBecause ..."),  # no blank line: read as a multi-line answer, kept whole
    ("Answer: The answer is B\n\nmore", True, "The answer is B"),  # "The" passes the short-answer check
    ("Answer: B\n\nmore", False, "B\n\nmore"),  # multi-line gold: nothing dropped
    ("Answer: ```\nline1\nline2\n```", False, "line1\nline2"),  # a code block's content
    ("Answer: 'hello'", True, "hello"),  # one level of quotes removed
    ("Answer: ['a', \"b\"]", True, "['a', 'b']"),  # JSON/literal re-serialised as a Python repr
    ("Answer: [unclosed", True, "[unclosed"),  # unparseable bracket text kept as is
    ("no marker at all", True, "no marker at all"),
])
def test_parse_answer_string(response, single_line, expected):
    assert mb.parse_answer_string(response, single_line) == expected


def test_parse_verbatim_keeps_inner_spacing():
    # verbatim_answer_string keeps the leading spaces of a code block's first line (code_output_result)
    assert mb.parse_answer_string("Answer: ```\n 3\n  5\n```", False, "verbatim_answer_string") == " 3\n  5"


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ("Reasoning.\n```json\n{\"a\": \"x\"}\n```", {"a": "x"}),
    ("Answer: {'a': 'x'}", {"a": "x"}),  # single quotes: Python literal
    ('{"a": 1} and later {"b": 2}', {"b": 2}),  # the last object wins
    ('{"outer": "{\\"inner\\": 1}"}', {"outer": {"inner": 1}}),  # a string holding JSON is inlined
    ("[1, 2] and [3]", []),  # official quirk: one greedy [...] candidate that does not parse
    ("Answer:\n{\n\"a\": 1\n}", {}),  # official quirk: "Answer:" narrows to its next line only
    ("nothing here", {}),
])
def test_parse_json(text, expected):
    assert mm.parse_json(text) == expected


def test_parse_response_json_fallback_and_answer_tags(hf_rows):
    row = hf_rows["stackoverflow_debug_QA/0"]
    parsed = mb.parse_response(row, '<think>..</think><answer>{"Programming type": "python", "Error line": 3}</answer>')
    assert parsed == {"Programming type": "python", "Error line": 3}
    # No JSON object: the raw response is used for every field (official fallback)
    assert mb.parse_response(row, "Error\n") == {field: "Error\n" for field in row.meta["answer"]}


# ------------------------------------------------------------------ metrics


@pytest.mark.parametrize("metric, response, gold, expected", [
    ("exact_str_match", "B", "B", 1),
    ("exact_str_match", "(B) 42", "B", 1),  # a one-letter gold cuts the response to its leading letter...
    ("exact_str_match", "Banana", "B", 1),  # ...even for a word (official quirk)
    ("exact_str_match", "b", "B", 0),
    ("exact_str_match", None, "N", 1),  # a missing JSON field is str(None) = "None", cut to "N" (official quirk)
    ("simple_str_match", "New-York.", "new york", 1),  # spaces, "-", "." removed, lower-cased
    ("simple_str_match", "3.5", "35", 1),  # "." removal makes 3.5 and 35 equal (official quirk)
    ("exact_str_match_case_insensitive", "YES", "yes", 1),
    ("exact_str_match_case_insensitive", 42, "42", 0),  # a non-string response scores 0
    ("multi_ref_phrase", "round disk", "['circle', 'round disk']", 1),
    ("multi_ref_phrase", "paris", "Paris\uff0cParis city", 1),  # a Chinese comma separates references
    ("positive_int_match", "3", "3", 1),
    ("positive_int_match", "0", "0", -1),  # both <= 0: field ignored
    ("positive_int_match", 3, "3", 0),  # a JSON int is literal-evaluated and fails (official quirk)
    ("number_rel_diff_ratio", "2.4", "2.5", pytest.approx(0.96)),
    ("number_rel_diff_ratio", "5", "0", 0),  # division by zero scores 0
    ("normalized_rmse", "0.55", "0.5", pytest.approx(0.5)),  # 1 - clip(|diff|, 0, 0.1) / 0.1
    ("angle_seq_float_rmse", "[90, 45]", "[85, 45]", pytest.approx(0.75)),
    ("set_equality", "dp, greedy", "['greedy', 'dp']", 1),  # a string is a literal or a comma list
    ("set_equality", "[dp, greedy]", "['greedy', 'dp']", 1),
    ("str_set_equality_comma", "A, b", "a, B", 1),
    ("str_set_equality_line_break", "x\\ny", "Y\nX", 1),  # a literal "\n" counts as a line break
    ("set_precision", "['#cat', '#dog']", "['#cat', '#pets']", 0.5),
    ("set_precision", "", "['#cat']", 1),  # an empty prediction has precision 1 (official quirk)
    ("set_precision", None, "['#cat']", 0),
    ("jaccard_index", "a, b, c", "b, c, d", 0.5),
    ("jaccard_index_case_insensitive", "['blue door', 'X']", "['Blue Door', 'Casa Mia']", pytest.approx(1 / 3)),
    ("chess_move_list_jaccard_index", "Nf3, Qxe7", "['Nf3', 'Qxe7#']", 1),  # check/mate marks ignored
    ("sequence_equality", "[1, 2, 3]", "1, 2, 3", 1),
    ("sequence_equality", "[3, 2, 1]", "1, 2, 3", 0),
    ("sequence_accuracy_case_insensitive", "['kenya', 'Mali', 'Chad']", "['Kenya', 'Chad', 'Mali']",
     pytest.approx(1 / 3)),
    ("longest_common_list_prefix_ratio", "[1, 2, 9]", "[1, 2, 3, 4]", 0.5),
    ("dict_equality", "{'a': '1'}", "{'a': '1'}", 1),
    ("dict_precision", "{'a': '1', 'b': '3'}", "{'a': '1', 'b': '2'}", 0.5),
    ("dict_exact_str_match_agg_recall", {"1": "CATS"}, "{'1': 'CATS', '5': 'ORE'}", 0.5),
    ("dict_jaccard_agg_jaccard", "{'a': [1, 2], 'b': [3]}", "{'a': [1, 2], 'c': [3]}", pytest.approx(1 / 3)),
    ("nbbox_iou_tuple", "[0.1, 0.1, 0.4, 0.5]", "[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9]]", 1),
    ("nbbox_iou_tuple", "[[0, 0, 0.5, 0.5], [0.9, 0.9, 1, 1]]", "[[0, 0, 0.5, 1]]", 0.25),  # mean over predictions
    ("nbbox_iou_single", "[0, 0, 0.5, 0.5]", "[0, 0, 0.5, 1]", 0.5),
    ("nbbox_iou_sequence", "[[0, 0, 1, 1], [0, 0, 1, 1]]", "[[0, 0, 1, 1], [0, 0, 0.5, 1]]", 0.75),
    ("xml_nbbox_iou_single", "<box>0, 0, 0.5, 0.5</box>", "<box>0, 0, 0.5, 1</box>", 0.5),
    ("xml_norm_point_distance", "<point>0.5, 0.5</point>", "<point>0.8, 0.9</point>", pytest.approx(0.5)),
    ("xml_norm_point_distance", "<point>1.5, 0.5</point>", "<point>0.5, 0.5</point>", 0),  # not normalised
    ("sequence_coords_similarity", "[[0.1, 0.2]]", "[[0.1, 0.2]]", 1),
    ("near_str_match", "the Eiffel tower", "Eiffel Tower", 1),  # articles dropped, lower-cased
    ("near_str_match", "Eifel Tower", "Eiffel Tower", 0),  # similarity 0.917 is kept (>= 0.9)...
    ("normalized_similarity_damerau_levenshtein", "abcd", "acbd", 0.75),  # a transposition costs 1
    ("code_result_exact_str_match", " 3\n  5", "```\n 3\n  5\n```", 1),
])
def test_metric(metric, response, gold, expected):
    if metric == "near_str_match" and response == "Eifel Tower":
        assert mm.field_score(metric, response, gold) == pytest.approx(11 / 12)  # ...not cut to 0
        return
    assert mm.field_score(metric, response, gold) == expected


@pytest.mark.parametrize("response, gold, expected", [
    ("42", "42", 1.0),
    ("41.7", "42", 1.0),  # within 1% of the gold
    ("41.5", "42", 0.0),
    ("x = 42", "42", 1.0),  # what follows "=" is kept
    ("\\(\\frac{1}{2}\\)", "0.5", 1.0),  # \( \) dropped, LaTeX fraction read by the LaTeX parser
    ("1,000", "1000", 1.0),
    ("50%", "0.5", 1.0),  # % becomes /100
    ("$1,200", "1200", 1.0),  # currency signs dropped
    ("2\\pi", "6.28", 1.0),  # pi becomes 3.14
    ("12.", "12", 0.0),  # official quirk: sympy reads "12." as 1
    ("5.", "5", 1.0),  # sympy rejects "5.", float() reads it
    ("2\\frac{1}{2}", "2.5", 0.0),  # a mixed number is a product for sympy: 1
    ("[2, 1]", "[1, 2]", 1.0),  # lists compared sorted
    ("(1, 2)", "(1, 2)", 0.0),  # tuples never match (the official check wants lists)
    ("42 m", "42", 0.0),  # units make it symbolic: simple_str_match("42 m", "42") fails
    ("forty-two", "Forty two", 1.0),  # both non-numeric: simple_str_match
])
def test_general_single_numerical_match(response, gold, expected):
    assert mm.field_score("general_single_numerical_match", response, gold) == expected


def test_boxed_single_numerical_match():
    assert mm.field_score("boxed_single_numerical_match", "so \\boxed{\\frac{24}{2}} done", "\\boxed{12}") == 1.0
    assert mm.field_score("boxed_single_numerical_match", "\\boxed{13}", "\\boxed{12}") == 0.0


# Outputs of the official number_it (sympy 1.13 LaTeX parser, then float(), then Python's eval) on these strings.
SYMPY_NUMBERS = [
    ("2^3", 8), ("e - 3/2", None), ("1.2e-3", None), ("1,234.5", 1234.5), ("(1, 2)", (1, 2)), ("[1, 2]", [1, 2]),
    ("E", 2.718), ("3E", 8.154), ("E(2)", None), ("\\frac12", 0.5), ("\\dfrac{3}{4}", 0.75), ("3 \\div 4", 0.75),
    ("1:2", 0.5), ("8:2:2", 2), ("2 3", 23), ("-2 3", -23), ("1 000", 1000), ("12 345.6", 12345.6), ("3,4", 3),
    ("1,00", 1), ("1,0000", 0), ("0.1,000", 0.1), ("2\\,000", 2000), ("2(3)", 6), ("(2+3)(4+5)", 45),
    ("2 x 3", 6), ("2x3", 6), ("x", None), ("2^3^2", 64), ("10^23", 10**23), ("2^-1", 2), ("2^{-1}", 0.5),
    ("(-8)^{1/3}", None), ("\\sqrt{4}", None), ("\\sqrt[3]{8}", 2), ("4!", None), ("|-3|", None), ("1/0", None),
    ("12.5\\%", 12.51), ("45\\%", 45100), ("25\u00b0C", 25), ("\u00a5300", 300), ("5'", 5), ("3 _ 2", 3),
    ("3)", 3), ("3 .", None), ("5 + ", 5), ("2**3", 2), ("3//2", 3), ("3 & 4", 0), ("7 < 8", 1), ("7 > 8", 0),
    ("3 = 3", 1), ("'5'", 5), (".5", 0.5), ("1..5", None), ("1.5.2", 1.5), ("()", ()), ("{}", None),
    ("[1,2]+[3]", [1, 2, 3]), ("7%3", 0.006979062811565304), ("1_000", 1), ("0x10", 0), ("007", 7),
    ("1 < 02", None), ("\\pi3.5", 10.99), ("1\\pi.%", 3.1), ("9^9^9", (9**9) ** 9), ("2^{10000}", None),
    ("1e400", None), ("2.5E3", 20.385), ("\\frac{3}{4}\\%", 75), ("3 (12.)", 3), ("2 + (3", 2), ("1234.", 6),
]


@pytest.mark.parametrize("text, expected", SYMPY_NUMBERS)
def test_number_value_matches_official_sympy_reading(text, expected):
    value = mm.number_value(text)
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-12)
    elif isinstance(expected, int) and expected > 2**53:
        assert value == pytest.approx(float(expected), rel=1e-12)
    else:
        assert value == expected and type(value) is type(expected)


# ------------------------------------------------------------------ query scores


@pytest.mark.parametrize("row_id, response, expected", [
    ("code_error_line_identification/0", "The loop on line 16 is wrong.\nAnswer: 16", 1.0),
    ("code_error_line_identification/0", "<think>line 16</think><answer>16</answer>", 1.0),
    ("code_error_line_identification/0", "<answer>Answer: 17</answer>", 0.0),
    ("MMMU_pro_exam_screenshot/0", "<answer>(D) 42</answer>", 1.0),
    ("stackoverflow_debug_QA/0", '{"Programming type": "PYTHON", "Programming execution": "Error", '
                                 '"Error line": "4"}', pytest.approx(2 / 3)),
    ("ocr_table_to_csv/0", "Answer: ```\nName, Age\nAnn, 31\nBob, 27\n```", 1.0),
    ("algebra/0", "Answer: x = 0.5", 1.0),
    ("algebra/1", "<answer>1000</answer>", 1.0),
    ("screenshot_lighteval_math/0", "Answer: \\boxed{12.0}", 1.0),
    # 9 positive_int fields; those with gold 0 and response 0 are ignored (-1), so the mean is over 3 fields
    ("shape_composition_colours/0", '{"red": "2", "orange": "0", "yellow": "1", "green": "0", "blue": "2", '
                                    '"purple": "0", "gray": "0", "black": "0", "pink": "0"}', pytest.approx(2 / 3)),
    ("shape_composition_colours/0", '{"red": "0", "orange": "0", "yellow": "0", "green": "0", "blue": "0", '
                                    '"purple": "0", "gray": "0", "black": "0", "pink": "0"}', 0.0),
    ("coco_object_detection_by_query_property/0",
     '{"number of objects": "2", "bounding boxes": [[0.1, 0.1, 0.4, 0.5]]}', 1.0),
    ("GUI_Act_Mobile_tap/0", "Answer: <point>0.7, 0.8</point>", 1.0),  # inside the eval_context's first box
    ("GUI_Act_Mobile_tap/0", "Answer: <point>0.1, 0.1</point>", 0.0),
    # min aggregation: the worse of the two point scores
    ("GUI_Act_Mobile_swipe/0", '{"Start Point": "<point>0.5, 0.8</point>", "End Point": "<point>0.5, 0.5</point>"}',
     pytest.approx(0.7)),
    ("crossword_mini_5x5/0", '{"across": {"1": "CATS", "5": "ORA"}, "down": {"1": "COW", "2": "ARE"}}', 0.75),
    # weighted mean (weights 1 and 3) of exact match 1 and number_rel_diff_ratio 1 - 0.1 / 2.5
    ("math_convexity_value_estimation/0", '{"convexity": "convex", "value": "2.4"}', pytest.approx(0.97)),
    ("code_output_result/0", "Answer: ```\n 3\n  5\n```", 1.0),
    ("nextqa_mc/0", "Answer: B", 1.0),
])
def test_score(hf_rows, row_id, response, expected):
    row = hf_rows[row_id]
    assert mb.score(row, response) == expected
    assert mb.is_correct(row, response) == (expected == 1.0)


_TIME_12H = "Answer: " + TIME_12H


@pytest.mark.parametrize("row_id, response, expected", [
    ("ocr_math_equation/0", "Answer: \\frac{b+a}{2}\\geq\\sqrt{ab}", 1.0),  # symbolic LaTeX equality
    ("ocr_math_equation/0", "Answer: \\frac{a+b}{2} \\leq \\sqrt{ab}", 0.0),
    ("image_translation_en2cn/0", "Answer: 我们在两个阶段预训练我们的图像适配器。", 1.0),  # GLEU
    pytest.param("code_programming_test_easy/0", _TIME_12H, 1.0, marks=needs_sandbox),  # both test cases pass
    pytest.param("code_programming_test_easy/0", _TIME_12H.replace("h < 12", "h < 22"), 0.5,
                 marks=needs_sandbox),  # 09:05 passes, 21:11 not
])
def test_score_latex_gleu_and_code(tmp_path_factory, row_id, response, expected):
    rows = {row.id: row for row in mb.load(_hf_dir(tmp_path_factory.mktemp("code")), run_code=True)}
    assert rows[row_id].meta["scorable"]
    assert mb.score(rows[row_id], response) == pytest.approx(expected)


def test_program_tasks_left_out_without_a_sandbox(tmp_path, monkeypatch):
    """With run_code set but no sandbox on this machine, program rows are left out and say why, naming the fix;
    scoring one refuses rather than run the code unsandboxed."""
    from engine import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.problem.cache_clear()
    try:
        row = {r.id: r for r in mb.load(_hf_dir(tmp_path), run_code=True)}["code_programming_test_easy/0"]
        assert row.meta["unsupported_metrics"] == ["program_judge"] and not row.meta["scorable"]
        with pytest.raises(ValueError, match="bwrap .bubblewrap. is not installed.*apt-get install -y bubblewrap"):
            mb.score(row, _TIME_12H)
    finally:
        sandbox.problem.cache_clear()


def test_score_planning(hf_rows):
    """The barman row carries its task card's eval_context and, as its answer, the card's gt_plan."""
    row = hf_rows["planning_screenshot_barman/0"]
    plan = row.meta["answer"]["plan"]
    assert mb.score(row, f"Plan follows.\nAnswer: {plan}") == 1.0
    assert mb.score(row, "Answer: " + plan.rsplit("\n", 1)[0]) == 0.0  # one action short of the goal
    assert mb.score(row, "Answer: (grasp left shot4)\n(grasp left shot4)") == 0.0  # the hand is no longer empty


def test_aggregate():
    mean = {"function": "mean", "field_weights": {"a": 1, "b": 3}}
    assert mb.aggregate({"a": 1, "b": 0}, mean) == 0.25
    assert mb.aggregate({"a": -1, "b": 1}, mean) == 1.0  # negative field scores are skipped
    assert mb.aggregate({"a": -1}, mean) == -1.0  # nothing left: -1 (score() reports it as 0)
    assert mb.aggregate({"a": 0.2, "b": 0.9}, {"function": "min", "field_weights": {}}) == 0.2


# ------------------------------------------------------------------ official numbers


def test_reproduces_grok_scores(grok):
    """Grok-2-vision's responses in the release's scored file: the rule-scored Answer field of
    scibench_w_solution_open_ended (json parser + general_single_numerical_match) and every query score
    (aggregating the recorded judge scores) match the official ones."""
    rows, data = grok
    by_id = {row.id: row for row in rows}
    for task in data:
        total = 0.0
        for query in task["query_response"]:
            row = by_id[f"{task['task_name']}/{query['query_idx']}"]
            official = query["scores"]["field"]
            ours = mb.field_scores(row, query["response"])
            for field, value in ours.items():  # None marks a judged field
                assert value is None or value == official[field]
            assert [f for f, v in ours.items() if v is None] == [
                f for f, m in row.meta["field_score_function"].items() if m in mm.JUDGE_METRICS]
            filled = {field: official[field] if value is None else value for field, value in ours.items()}
            assert mb.aggregate(filled, row.meta["aggregation"]) == pytest.approx(query["scores"]["query"])
            total += max(0.0, mb.aggregate(filled, row.meta["aggregation"]))
        assert total / len(task["query_response"]) == pytest.approx(task["mean_task_score"])
    scibench = [q["scores"]["field"]["Answer"] for t in data if t["task_name"].startswith("scibench")
                for q in t["query_response"]]
    assert len(scibench) == 25 and sum(scibench) == 5  # 5 of 25 answers right, as officially scored


def test_reproduces_qwen2_vl_summary():
    """Qwen2-VL-7B's per-task scores give the release's summary: core 0.3294 (440 tasks), open 0.4487 (65),
    overall 0.3447 (the macro mean over all 505 tasks)."""
    tasks = json.loads((FIXTURES / "results" / "qwen2_vl_7b_task_results.json").read_text())
    summary = json.loads((FIXTURES / "results" / "qwen2_vl_7b_summary_and_keyword_stats.json").read_text())
    official = summary["model_summary"]["model_summary"]
    out = mb.macro_scores({t["name"]: t["score"] for t in tasks}, {t["name"]: t["eval_type"] for t in tasks})
    assert out["core"] == pytest.approx(official["core"]["macro_mean_score"], abs=1e-12)
    assert out["open"] == pytest.approx(official["open"]["macro_mean_score"], abs=1e-12)
    assert out["overall"] == pytest.approx(official["overall_score"], abs=1e-12)
    assert (out["num_core_tasks"], out["num_open_tasks"]) == (440, 65)


def test_summarize(hf_rows):
    rows = [hf_rows["algebra/0"], hf_rows["algebra/1"], hf_rows["MMMU_pro_exam_screenshot/0"],
            hf_rows["table2latex_complex/0"]]
    out = mb.summarize(rows, [1.0, 0.0, 1.0, None])
    assert out["task_means"] == {"algebra": 0.5, "MMMU_pro_exam_screenshot": 1.0}
    assert out["core"] == 0.75 and out["open"] == 0.0 and out["skipped_tasks"] == ["table2latex_complex"]


# ------------------------------------------------------------------ the full shared files


@pytest.mark.skipif(not SHARED.exists(), reason="needs the shared benchmark files")
def test_shared_files(tmp_path):
    table_path = SHARED / "task_metrics_from_task_examples.json"
    task_file = SHARED / "results" / "SI_results" / "Grok-2-vision-1212" / "data_with_scores_open.first_tasks.json"
    rows = mb.load(_task_file_dir(tmp_path, task_file, table_path))
    assert len(rows) == 291 and all(row.meta["needs_judge"] for row in rows)
    # Every metric of the shipped configuration is implemented, judged, or listed as unsupported.
    table = json.loads(table_path.read_text())
    known = set(mb.RULE_METRICS) | set(mb.ALL_CONTEXT_METRICS) | mm.JUDGE_METRICS | set(mm.UNSUPPORTED_METRICS)
    used = {m for info in table.values() for m in info["field_score_function"].values()}
    assert used <= known
    rule = {t: info for t, info in table.items() if not set(info["field_score_function"].values()) & mm.JUDGE_METRICS}
    unsupported = {t for t, info in rule.items()
                   if set(info["field_score_function"].values()) & set(mm.UNSUPPORTED_METRICS)}
    assert (len(rule), len(unsupported)) == (440, 0)  # but worldle (geo_proximity, a global aux metric): 439 scorable
