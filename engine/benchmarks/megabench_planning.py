"""MEGA-Bench `symbolic_planning_test`: replay a PDDL plan from the response and check that it reaches the goal.

The rule is re-stated from the official evaluator (TIGER-AI-Lab/MEGA-Bench,
`megabench/metrics/scoring/symbolic_planning.py`, commit ee324ab, Apache-2.0); the code is ours. It scores the
13 planning_screenshot_* / planning_visual_* tasks. The evaluator passes the parsed `plan` field (a string, a
list/tuple of lines, or None) and the query's eval_context (`domain_pddl`, `task_pddl`, `gt_plan`; the latter is
unused). The score is 1 when every action of the plan is known, has the right number of arguments and meets its
preconditions in turn, and the final state meets the goal; otherwise 0. Like the official `MetricType.match`
wrapper, any exception (a malformed domain, a missing key, a response of another type) scores 0.

The official checker is a string simulator, not a PDDL planner, and its quirks change scores, so they are kept:
- States are lists of the literal text of the `(:init` groups; a fact holds when the same string is in the list,
  so spacing and case matter, duplicates count (a delete removes one copy) and numeric fluents such as
  `(= (total-cost) 0)` or `(increase (total-cost) 5)` are just more strings.
- The initial state is the top-level groups after the first `(:init`, the goal those after the first `(and` of the
  task text (any `(and`, not only the goal's). Without `(and` the goal is empty, so any executable plan scores 1;
  without `(:init` the state starts empty. If either marker occurs twice the official code gets a dict of section
  names instead: facts are then those names, and any change to such a state fails.
- A `(not ...)` precondition or goal fails only if the literal `(not ...)` text is in the state, which never
  happens for a well-formed task: negative preconditions/goals are never enforced (termes relies on this).
- Parameters are substituted with `re.sub(r"\\?NAME(?=[^\\w-])", obj, cond)` one after another, the name and the
  object used unescaped (a regex character in a name or a backslash in an object behaves as in `re`).
- An effect containing `(not ` deletes the one group after it (two groups or two `(not ` raise, so 0); other
  effects are added. Deletes are applied before adds.
- A domain needs at least two `(:action`s; parameters come from the last definition of a name, preconditions and
  effects from the text between the first and the second `(:action NAME` (the second may begin a longer name:
  termes' `move` ends where `(:action move-up` starts). Clauses are the groups inside a leading `(and`, with
  ` - type` annotations removed; a condition without `(and` is cut at its first `)`.
- Parameter types are never checked: any word is accepted as an object (grippers' `move` can go "to" a ball).
- Response lines count only if they start with "(" before stripping; an action is the line without its first and
  last characters, split on single spaces (so a trailing comment or a double space changes the argument count).

Known difference: none found. The official code keeps each action's clauses in a set, so effects of the same
kind are applied in string-hash order (it changes with PYTHONHASHSEED); the same set is built here, so both orders
agree within one process. The order only matters when one effect adds a fact and another deletes it through a
`(not ` that is not at the start of its clause (or an object name containing "(not"), which no MEGA-Bench
domain does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_NOT = "(not "
_PARAM_NAME = re.compile(r"\?([^\s?)]+)")  # the official parameter-list regexes yield exactly these names


@dataclass(frozen=True)
class _Action:
    params: tuple[str, ...]  # parameter names without "?", in order, each once
    pre: tuple[str, ...]  # condition templates, `(not ` first (the official stable sort of a set)
    post: tuple[str, ...]


class _Facts:
    """A state, goal list or delete list as the official code holds it: a list of strings, or (when the section
    marker occurred more than once) a dict whose keys are the section names; such a dict cannot be changed."""

    def __init__(self, items: list[str], frozen: bool):
        self.items = items
        self.frozen = frozen

    def __contains__(self, fact: str) -> bool:
        return fact in self.items

    def remove(self, fact: str) -> None:
        if self.frozen:
            raise TypeError("the official state is a dict here, which has no remove")
        self.items.remove(fact)

    def append(self, fact: str) -> None:
        if self.frozen:
            raise TypeError("the official state is a dict here, which has no append")
        self.items.append(fact)


# ------------------------------------------------------------------ parenthesis scanning


def _top_groups(text: str) -> tuple[list[str], int]:
    """The "(...)" groups at depth 1 of `text`, read until a ")" closes the enclosing group (the whole text if
    none does), and the index just after that ")". An unmatched "(" at the end contributes nothing."""
    groups: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(text):
        if char == ")":
            if depth == 0:
                return groups, i + 1
            depth -= 1
            if depth == 0:
                groups.append(text[start : i + 1])
        elif char == "(":
            if depth == 0:
                start = i
            depth += 1
    return groups, len(text)


def _first_word(text: str) -> str:
    """The first whitespace-separated word of `text`, or "" (the official `re.split(r"\\s+", s.strip())[0]`)."""
    words = text.split()
    return words[0] if words else ""


def _sections(text: str, marker: str) -> dict[str, list[str]]:
    """Each non-overlapping `marker ... )` section of `text`, by its first word, with its top-level groups
    (a later section of the same name replaces an earlier one, keeping the earlier one's place)."""
    out: dict[str, list[str]] = {}
    while marker in text:
        text = text.split(marker, 1)[1]
        groups, end = _top_groups(text)
        out[_first_word(text)] = groups
        text = text[end:]
    return out


def _marked_groups(text: str, marker: str) -> _Facts:
    """The official `parse_pddl_attr_from_string(text, marker)[1]`: no marker gives nothing, one marker the
    top-level groups after it, several the dict of sections (kept as its names, which is what lookups see)."""
    parts = text.split(marker)  # not str.count: a non-string must fail here as it does in the official code
    if len(parts) == 1:
        return _Facts([], frozen=False)
    if len(parts) == 2:
        return _Facts(_top_groups(parts[1])[0], frozen=False)
    return _Facts(list(_sections(text, marker)), frozen=True)


# ------------------------------------------------------------------ domain


def _strip_types(clause: str) -> str:
    """Remove ` - type` annotations from one clause the official way: a piece after " - " that holds a single word
    before its first ")" keeps only that ")" and what follows; otherwise it loses its first space-separated word.
    A piece without the ")" or the space that rule needs raises (so the domain scores 0)."""
    pieces = clause.split(" - ")
    if len(pieces) == 1:
        return clause
    out = [pieces[0]]
    for piece in pieces[1:]:
        piece = piece.strip()
        if len(piece.split(")")[0].split()) == 1:
            out.append(")" + piece.split(")", 1)[1])
        else:
            out.append(" " + piece.split(" ", 1)[1])
    return "".join(out).strip()


def _and_clauses(cond: str) -> set[str]:
    """The depth-2 groups of a condition that starts with "(and", up to the close of the "(and", each without its
    type annotations. A set filled in text order like the official one, so that it iterates in the same order."""
    clauses: set[str] = set()
    depth = 0
    start = 0
    for i, char in enumerate(cond):
        if char == "(":
            depth += 1
            if depth == 2:
                start = i
        elif char == ")":
            depth -= 1
            if depth == 0:
                break
            if depth == 1:
                clauses.add(_strip_types(cond[start : i + 1]))
    return clauses


def _condition(action_text: str, tag: str) -> tuple[str, ...]:
    """The clauses after the first `tag` (":precondition" / ":effect") of an action's text, negated ones first,
    otherwise in set order (which can matter for effects, see the module docstring)."""
    cond = action_text.split(tag)[1].strip()
    if cond.startswith("(and"):
        clauses = _and_clauses(cond)
    else:
        clauses = {cond.split(")")[0].strip() + ")"}  # a single clause: cut at its first ")"
    return tuple(sorted(clauses, key=lambda clause: not clause.startswith(_NOT)))


def _parse_domain(domain_pddl: str) -> dict[str, _Action]:
    """Actions by name. Raises (score 0) on what the official Domain constructor rejects: fewer than two
    `(:action`s, an action without exactly three top-level groups, a missing tag or an unparsable clause."""
    if len(domain_pddl.split("(:action")) < 3:
        raise ValueError("the official parser needs at least two actions")
    actions = {}
    for name, groups in _sections(domain_pddl, "(:action").items():
        if len(groups) != 3:
            raise ValueError(f"action {name!r} has {len(groups)} top-level groups, not 3")
        params = tuple(dict.fromkeys(_PARAM_NAME.findall(groups[0])))
        # Conditions are read from the text between the first and second `(:action NAME` (a longer name counts).
        text = domain_pddl.split(f"(:action {name}")[1]
        actions[name] = _Action(params, _condition(text, ":precondition"), _condition(text, ":effect"))
    return actions


# ------------------------------------------------------------------ plan replay


def _plan_lines(response: Any) -> list[str]:
    """The candidate action lines: those starting with "(" (before stripping), stripped."""
    if isinstance(response, str):
        lines = response.split("\n")
    elif isinstance(response, tuple | list):
        lines = list(response)
    else:
        raise TypeError(f"unsupported response type {type(response).__name__}")
    return [line.strip() for line in lines if line.startswith("(")]


def _bind(actions: dict[str, _Action], line: str) -> tuple[_Action, list[tuple[str, str]]]:
    """The action a plan line names and its (parameter, object) pairs; raises on an unknown name or a wrong
    argument count. The line loses its first and last character, whatever they are, and splits on single spaces."""
    words = line[1:-1].split(" ")
    action = actions[words[0].strip()]
    objects = words[1:]
    if len(objects) != len(action.params):
        raise ValueError(f"{line!r} has {len(objects)} arguments, the action takes {len(action.params)}")
    return action, list(zip(action.params, objects, strict=True))


def _ground(template: str, binding: list[tuple[str, str]]) -> str:
    """Substitute each parameter in turn; a later parameter can match text an earlier object brought in."""
    for param, obj in binding:
        template = re.sub(rf"\?{param}(?=[^\w-])", obj, template)  # `param` is used as regex text, unescaped
    return template


def _holds(state: _Facts, fact: str) -> bool:
    """String membership; a "(not " condition holds unless that literal text is in the state."""
    return (fact in state) != fact.startswith(_NOT)


def _apply(state: _Facts, effects: tuple[str, ...], binding: list[tuple[str, str]]) -> None:
    """Apply grounded effects in order: one containing "(not " deletes one copy of its single inner group (if
    present), any other is appended unless its stripped text is already there."""
    for template in effects:
        effect = _ground(template, binding)
        deleted = _marked_groups(effect, _NOT)
        if deleted.frozen:  # the official dict: its key 0 is looked up, or the length assertion fails
            raise ValueError(f"{effect!r} contains '(not ' more than once")
        if deleted.items:
            if len(deleted.items) != 1:
                raise ValueError(f"{effect!r} negates {len(deleted.items)} groups")
            if deleted.items[0] in state:
                state.remove(deleted.items[0])
        elif effect.strip() not in state:
            state.append(effect)


def _score(response: Any, eval_context: dict) -> int:
    """The official SymbolicPlanningMetricTest.match without the wrapper: errors propagate."""
    actions = _parse_domain(eval_context["domain_pddl"])
    lines = _plan_lines(response)
    task_pddl = eval_context["task_pddl"]
    state = _marked_groups(task_pddl, "(:init")
    goals = _marked_groups(task_pddl, "(and")
    for line in lines:
        action, binding = _bind(actions, line)
        if not all(_holds(state, _ground(cond, binding)) for cond in action.pre):
            return 0
        _apply(state, action.post, binding)
    return int(all(_holds(state, goal) for goal in goals.items))


def symbolic_planning_test(response: Any, eval_context: dict) -> int:
    """1 if the plan in `response` (text, or a list/tuple of lines) is executable in `eval_context["domain_pddl"]`
    from the `(:init` of `eval_context["task_pddl"]` and ends in its goal, else 0 (also for None, other types and
    any error, as the official MetricType.match wrapper does)."""
    try:
        return _score(response, eval_context)
    except Exception:
        return 0


CONTEXT_METRICS = {"symbolic_planning_test": symbolic_planning_test}
