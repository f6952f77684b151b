"""The import graph of engine/: no cycles, and infrastructure never imports algorithm code.

The graph comes from the source (ast), not from importing: every `import` and `from ... import` of an engine
module, at module level or inside a function (a lazy import still ties two modules together), except those under
`if TYPE_CHECKING:` (never executed). `importlib.import_module(name)` is not an edge: that is how
`engine.stages.run_stage` imports a stage kind's module only when a stage of that kind runs.

Infrastructure (INFRA below) is what every stage uses: distributed setup, environment and logging, model and
attention, FSDP2 with the optimizer, the trainer loop with checkpoints and metrics, data loading and row packing,
the rollout backends, and the config sections (engine/sections.py). None of it may import, even transitively,
the stage modules, the rewards, the LLM judge or the format corruptions. The recipe loader (engine/config.py) is
not in that list: it builds every stage kind's config, so it imports engine/stages/config.py (which uses the
judge's config and the corruption names, and engine/corrupt.py checks its output with the reward's format rule);
it must still import no stage runner module and no torch, so reading a recipe stays cheap.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INFRA = ["engine.attention", "engine.checkpoint", "engine.data", "engine.dist", "engine.env", "engine.fsdp",
         "engine.log", "engine.metrics", "engine.model", "engine.packed_rows", "engine.rollout", "engine.rollout.base",
         "engine.rollout.builtin", "engine.rollout.vllm_backend", "engine.sections", "engine.trainer"]
ALGORITHMS = ("engine.stages", "engine.rewards", "engine.judge", "engine.corrupt")
RUNNERS = ("engine.stages.toy", "engine.stages.sft", "engine.stages.dpo", "engine.stages.grpo",
           "engine.stages.distill", "engine.stages.eval", "engine.stages.common")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "engine").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(engine modules, top-level external packages) that module `name` imports."""
    internal, external = set(), set()
    is_package = path.name == "__init__.py"

    def add(target: str) -> None:
        if target.split(".")[0] in ("engine", "kernels"):
            # `from engine.x import y`: y may be a submodule or a name; keep the longest module that exists.
            while target and target not in modules and target.startswith("engine"):
                target = target.rpartition(".")[0]
            if target.startswith("engine") and target != "engine":
                internal.add(target)
        else:
            external.add(target.split(".")[0])

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import: resolve against this module's package
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module or ""
                for alias in child.names:
                    add(f"{mod}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    internal.discard(name)
    return internal, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = _imports(name, path, modules)
    return edges, external


def _parents(name: str) -> list[str]:
    """Packages whose `__init__` runs when `name` is imported (engine's own is empty)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    """Every engine module that importing `start` executes, parent packages included."""
    seen, todo = set(), [start, *_parents(start)]
    while todo:
        name = todo.pop()
        if name in seen or name not in edges:
            continue
        seen.add(name)
        for target in edges[name]:
            todo.extend([target, *_parents(target)])
    return seen


def test_no_import_cycles():
    edges, _ = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]) if target in path
                              else f"{node} -> {target}")
            elif target not in state:
                dfs(target, [*path, node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            dfs(name, [])
    assert cycles == []


def test_infrastructure_imports_no_algorithm_code():
    edges, _ = _graph()
    assert set(INFRA) <= set(edges), sorted(set(INFRA) - set(edges))
    bad = {}
    for name in INFRA:
        hits = sorted(m for m in _closure(name, edges) if m.startswith(ALGORITHMS))
        if hits:
            bad[name] = hits
    assert bad == {}


def test_recipe_loader_imports_no_stage_runner_and_no_torch():
    edges, external = _graph()
    closure = _closure("engine.config", edges)
    assert sorted(m for m in closure if m.startswith(RUNNERS)) == []
    heavy = {m: sorted(external[m] & {"torch", "transformers", "datasets", "PIL"}) for m in closure}
    assert {m: v for m, v in heavy.items() if v} == {}


def test_stage_registry_matches_runner_modules():
    from engine.stages.config import STAGE_KINDS

    modules = _modules()
    assert list(STAGE_KINDS) == ["toy", "sft", "dpo", "grpo", "distill", "eval"]
    for kind, cls in STAGE_KINDS.items():
        assert cls.runner in modules, (kind, cls.runner)
        assert "def run(" in modules[cls.runner].read_text(), cls.runner
