"""`python -m engine.eval`: any models on any benchmarks in one command, with the eval stage's code and report; a
rerun resumes, a rerun with other settings or models stops."""

import json

import pytest

from engine.eval import main, model_names, parse_benchmarks


def test_names_and_benchmark_specs():
    assert model_names(["Qwen/Qwen2.5-VL-7B-Instruct", "runs/specs/specs/hf", "/ckpt/specs/hf/"]) == {
        "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct", "specs": "runs/specs/specs/hf",
        "specs-2": "/ckpt/specs/hf/"}
    assert parse_benchmarks("mathvista=/d/mv, mmmu=/d/mmmu,mine:toy:ood=/t.parquet") == [
        {"name": "MathVista", "kind": "mathvista", "path": "/d/mv", "group": "id"},
        {"name": "MMMU", "kind": "mmmu", "path": "/d/mmmu", "group": "ood"},
        {"name": "mine", "kind": "toy", "path": "/t.parquet", "group": "ood"}]
    with pytest.raises(ValueError, match="not kind=DIR"):
        parse_benchmarks("mathvista")


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--benchmarks", "mathvistaa=/d"]) == 2
    assert "'mathvistaa' not in" in capsys.readouterr().err
    assert main(["--model", f"{tmp_path}/a/b", "--benchmarks", f"toy={tmp_path}"]) == 2
    assert "neither directories nor Hugging Face ids" in capsys.readouterr().err


def test_two_models_one_command_then_a_rerun(tmp_path, toy_world, capsys):
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "hf").symlink_to(toy_world / "hf")
    data = toy_world / "data"
    args = ["--model", str(toy_world / "hf"), "--model", str(tmp_path / "trained" / "hf"),
            "--benchmarks", f"toy_id:toy:id={data / 'test.parquet'},toy_ood:toy:ood={data / 'test_ood.parquet'}",
            "--out", str(tmp_path / "out"), "--max_new_tokens=8", "--chunk_prompts=8"]
    assert main(args) == 0
    stage = tmp_path / "out" / "eval"
    scores = json.loads((stage / "scores.json").read_text())
    assert list(scores["models"]) == ["toy_world0", "trained"] and scores["base"] == "toy_world0"
    assert scores["models"]["trained"]["benchmarks"]["toy_id"]["num"] == 16
    # The same weights answer the same (greedy): no gain, and the report says it is not shown.
    assert scores["models"]["trained"]["g_id"] == 0.0
    report = (stage / "report.md").read_text()
    assert "| trained |" in report and "**not shown: the interval includes zero**" in report
    capsys.readouterr()

    assert main(args) == 0  # everything predicted already: nothing generated again
    assert "0 to go" in capsys.readouterr().out
    assert main([*args[:-2], "--max_new_tokens=16", "--chunk_prompts=8"]) == 2
    assert "max_new_tokens: ran with 8, now 16" in capsys.readouterr().out
