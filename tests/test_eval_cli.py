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
    # A setting problem names the stage like a recipe's does ("eval: the ...", not "eval.the ...").
    assert main(["--model", str(tmp_path), "--benchmarks", f"mine:toy:id={tmp_path}/t.parquet"]) == 2
    assert "  eval: the Generalization Factor needs benchmarks in both groups" in capsys.readouterr().err


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


def test_sampling_flags_set_the_eval_stage(tmp_path, monkeypatch, capsys):
    import engine.eval

    seen = []
    monkeypatch.setattr(engine.eval, "_run", lambda stage, names, out: seen.append(stage) or 0)
    args = ["--model", str(tmp_path), "--benchmarks", f"toy={tmp_path}"]
    assert main(args) == 0
    assert (seen[-1].samples, seen[-1].temperature, seen[-1].top_p, seen[-1].pass_ks()) == (0, 1.0, 1.0, [])
    assert main([*args, "--samples", "8", "--temperature", "0.7", "--top-p", "0.9", "--pass-k", "1,8,4"]) == 0
    assert (seen[-1].samples, seen[-1].temperature, seen[-1].top_p, seen[-1].pass_ks()) == (8, 0.7, 0.9, [1, 4, 8])
    assert main([*args, "--samples=8"]) == 0 and seen[-1].pass_ks() == [1, 2, 4, 8]  # the stage's default ks

    for bad, message in [(["--temperature", "0.7"], "--temperature only apply to sampled responses: add --samples"),
                         (["--samples", "2", "--pass-k", "1,x"], "--pass-k: '1,x' is not a comma-separated list"),
                         (["--samples", "2", "--pass-k", "4"], "pass_k [4]: each k must be in [1, samples = 2]"),
                         (["--samples", "2", "--temperature", "0"], "temperature must be > 0 to sample")]:
        assert main([*args, *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
    assert len(seen) == 3  # no bad command got as far as running


def test_sampled_evaluation_writes_pass_at_k(tmp_path, toy_world, capsys):
    data = toy_world / "data"
    args = ["--model", str(toy_world / "hf"), "--benchmarks", f"toy_id:toy:none={data / 'test.parquet'}",
            "--out", str(tmp_path / "out"), "--max_new_tokens=8", "--chunk_prompts=8",
            "--samples", "2", "--temperature", "0.7", "--top-p", "0.9", "--pass-k", "1,2"]
    assert main(args) == 0
    stage = tmp_path / "out" / "eval"
    scores = json.loads((stage / "scores.json").read_text())
    assert scores["sampling"] == {"samples": 2, "temperature": 0.7, "top_p": 0.9, "pass_k": [1, 2]}
    sampled = scores["models"]["toy_world0"]["benchmarks"]["toy_id"]["sampled"]
    assert sampled["n"] == 2 and sampled["num"] == 16 and set(sampled["pass_at_k"]) == {"1", "2"}
    assert sampled["pass_at_k"]["1"] <= sampled["pass_at_k"]["2"]  # more tries never pass less often
    lines = [json.loads(x) for x in (stage / "predictions" / "toy_world0" / "toy_id.samples.jsonl").open()]
    assert len(lines) == 16 and {(x["n"], x["temperature"], x["top_p"], len(x["responses"])) for x in lines} == {
        (2, 0.7, 0.9, 2)}
    assert "## Sampled decoding (2 samples a prompt)" in (stage / "report.md").read_text()
    capsys.readouterr()
    assert main([*args[:-8], "--samples", "4"]) == 2  # other sampling settings: a new directory, not a mix
    assert "samples: ran with 2, now 4" in capsys.readouterr().out
