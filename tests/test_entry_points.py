"""The installed commands (setup.py console_scripts) point at functions that exist and take argv."""

import ast
import importlib
import inspect

from .conftest import REPO


def _console_scripts() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    entry = next(k.value for k in call.keywords if k.arg == "entry_points")
    scripts = ast.literal_eval(entry)["console_scripts"]
    return dict(tuple(part.strip() for part in s.split("=")) for s in scripts)


def test_console_scripts_resolve():
    scripts = _console_scripts()
    assert set(scripts) == {"specs-train", "specs-eval", "specs-config", "specs-plan"}
    for name, target in scripts.items():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        assert list(inspect.signature(fn).parameters) == ["argv"], name  # argv=None reads sys.argv


def test_specs_plan_runs_as_installed(tmp_path, capsys):
    """What `specs-plan RECIPE` calls: engine.plan.main with the command line, exit codes as documented."""
    from engine.plan import main

    assert main([str(tmp_path / "missing.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
