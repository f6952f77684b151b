"""Compare our sandboxed MEGA-Bench `program_judge` (engine/benchmarks/megabench_code.py) with the official
CodeTester, case by case: the pass/fail verdict of every (program, test case) must agree.

    python bench/compare_program_judge.py --official PATH/megabench/metrics/scoring/program_judge.py \
        [--tasks ../shared/benchmarks/megabench/task_metrics_from_task_examples.json] [--out results.jsonl]

Not run by `make test`: it executes programs unsandboxed through the official code (only the programs below,
written for this comparison) and takes a few minutes. The official file is not part of this repository; take it
from a MEGA-Bench checkout (TIGER-AI-Lab/MEGA-Bench, unchanged from 1a52f58 to ee324ab). It is imported as
`metrics.scoring.program_judge`, as the official evaluator imports it (a program without a main block sees that
`__name__`), in a separate process.

Test-case sets: the 8 program tasks' real test cases (their task cards' `eval_context`, 15 cases), and synthetic
sets for behaviours that decide verdicts (the input feed, `__name__`, the official module's globals, output length
at the 64 KiB result-pipe boundary, Unicode, trailing whitespace). Programs: solutions of 4 real tasks in several
styles (main block, top level, helpers that fail without a main block), and programs that raise, exit, read past
the input, read stdin, time out, or write to stderr. Every program runs on every set, except the slow ones (a time
limit costs 2 s officially, an exit 10 s), which run on `SLOW_SETS`. Exit status: 0 when no verdict differs.
"""

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.benchmarks.megabench_code import run_case  # noqa: E402

TASKS = REPO.parent / "shared" / "benchmarks" / "megabench" / "task_metrics_from_task_examples.json"
CODE_TASKS = ("code_programming_extremely_hard", "code_programming_test_advanced", "code_programming_test_easy",
              "code_programming_test_hard", "code_translation_Python", "code_translation_advanced",
              "code_translation_easy", "code_translation_hard")

_LONG = 65_510  # measured: the longest ASCII output the official result queue passes (65,515 fails)
SYNTHETIC = {
    "sum_ab": [{"input": ["1 2"], "expected": "3"}, {"input": ["-5 5"], "expected": "0"},
               {"input": ["10 20", "ignored"], "expected": "30"}],
    "echo3": [{"input": ["a", "b", "c"], "expected": "a\nb\nc"}],
    "clock12": [{"input": ["00:00"], "expected": "12:00 AM"}, {"input": ["12:30"], "expected": "12:30 PM"},
                {"input": ["23:59"], "expected": "11:59 PM"}],
    "rotate": [{"input": ["3 1", "7 8 9"], "expected": "9 7 8"}, {"input": ["4 8", "1 2 3 4"], "expected": "1 2 3 4"}],
    "long_ok": [{"input": [str(_LONG)], "expected": "x" * _LONG}],
    "long_over": [{"input": [str(_LONG + 5)], "expected": "x" * (_LONG + 5)}],
    "module_name": [{"input": [], "expected": "metrics.scoring.program_judge"}],
    "main_name": [{"input": [], "expected": "__main__"}],
    "globals": [{"input": [], "expected": "[1, 2]"}],
    "unicode": [{"input": ["h\u00e9llo \u2603"], "expected": "h\u00e9llo \u2603"}],
    "count_lines": [{"input": ["1000"], "expected": "\n".join(str(i) for i in range(1, 1001))}],
    "string_input": [{"input": "abc", "expected": "a\nb\nc"}, {"input": [], "expected": ""}],
}
SLOW_SETS = ("sum_ab", "echo3", "code_programming_test_easy")

_CLOCK = """
h, m = map(int, input().split(":"))
print(f"{(h - 1) % 12 + 1}:{m:02d} {'AM' if h < 12 else 'PM'}")
"""
_ROTATE = """
n, k = map(int, input().split())
a = input().split()
k %= n
print(" ".join(a[n - k:] + a[:n - k]))
"""
_RADIX = """
def value(s, radix):
    v = 0
    for ch in s:
        d = int(ch) if ch.isdigit() else ord(ch) - ord("a") + 10
        v = v * radix + d
    return v


def solve(line):
    a, b, tag, radix = line.split()
    if tag == "2":
        a, b = b, a
    target = value(a, int(radix))
    low = max(int(ch, 36) for ch in b) + 1
    high = max(low, target) + 1
    while low <= high:
        mid = (low + high) // 2
        v = value(b, mid)
        if v == target:
            return str(mid)
        low, high = (mid + 1, high) if v < target else (low, mid - 1)
    return "Impossible"
"""
_LINKED = """
def main():
    first, n, k = input().split()
    n, k = int(n), int(k)
    nodes = {}
    for _ in range(n):
        addr, data, nxt = input().split()
        nodes[addr] = (data, nxt)
    order = []
    while first != "-1":
        order.append(first)
        first = nodes[first][1]
    for i in range(0, len(order) - len(order) % k, k):
        order[i:i + k] = order[i:i + k][::-1]
    for i, addr in enumerate(order):
        print(addr, nodes[addr][0], order[i + 1] if i + 1 < len(order) else "-1")
"""
PROGRAMS = {
    "clock_top": _CLOCK,
    "clock_main": "def main():\n" + "".join(f"    {x}\n" for x in _CLOCK.strip().splitlines())
                  + 'if __name__ == "__main__":\n    main()\n',
    "clock_prompt": _CLOCK.replace("input()", 'input("Time? ")'),
    "rotate_top": _ROTATE,
    "rotate_comprehension": _ROTATE.replace('" ".join(a[n - k:] + a[:n - k])',
                                            '" ".join([a[(i - k) % n] for i in range(n)])'),
    "count_le_top": "n, m = map(int, input().split())\nprint(sum(1 for x in input().split() if int(x) <= m))\n",
    "count_le_loop": "n, m = map(int, input().split())\nc = 0\nfor x in input().split():\n    c += int(x) <= m\n"
                     "print(c)\n",
    "radix_main": _RADIX + '\nif __name__ == "__main__":\n    print(solve(input()))\n',
    "radix_top": _RADIX + "\nprint(solve(input()))\n",
    "radix_single_quotes": _RADIX + "\nif __name__ == '__main__':\n    print(solve(input()))\n",
    "linked_main": _LINKED + '\nif __name__ == "__main__":\n    main()\n',
    "linked_stdin": _LINKED.replace("input()", "sys.stdin.readline()").replace("def main", "import sys\ndef main")
                    + '\nif __name__ == "__main__":\n    main()\n',
    "sum_ab": "a, b = map(int, input().split())\nprint(a + b)\n",
    "sum_ab_trailing": "a, b = map(int, input().split())\nprint(str(a + b) + '   \\n\\n')\n",
    "sum_ab_leading": "a, b = map(int, input().split())\nprint(' ' + str(a + b))\n",
    "sum_ab_stderr": "import sys\na, b = map(int, input().split())\nprint('note', file=sys.stderr)\nprint(a + b)\n",
    "echo_eof": "while True:\n    try:\n        print(input())\n    except EOFError:\n        break\n",
    "echo_any": "while True:\n    try:\n        print(input())\n    except Exception:\n        break\n",
    "repeat_x": "print('x' * int(input()))\n",
    "count_up": "for i in range(1, int(input()) + 1):\n    print(i)\n",
    "name": "print(__name__)\n",
    "name_main": 'if __name__ == "__main__":\n    print(__name__)\n',
    "json_no_import": "print(json.dumps([1, 2]))\n",
    "unicode_echo": "s = input()\nprint(s)\n",
    "raise": "x = input()\nraise ValueError('no')\n",
    "recursion": "def f(n):\n    return f(n + 1)\nf(0)\n",
    "big_list": "a = [0] * 10_000_000\nprint(len(a) // 10_000_000)\n",
    # slow: each runs on SLOW_SETS only
    "sleep_1s": "import time\ntime.sleep(1.0)\na = input()\nprint(a)\n",
    "forever": "while True:\n    pass\n",
    "exit_after_print": "import sys\nprint(input())\nsys.exit(0)\n",
    "os_exit": "import os\nprint(input())\nos._exit(0)\n",
}
SLOW_PROGRAMS = ("sleep_1s", "forever", "exit_after_print", "os_exit")

# The official side: CodeTester per (program, set), each case's verdict and output, one JSON line per job.
_OFFICIAL = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from metrics.scoring.program_judge import CodeTester
for line in sys.stdin:
    job = json.loads(line)
    score, results = CodeTester(job["code"], job["cases"], verbose=False).run_tests()
    print(json.dumps([[r["result"] == "Passed", str(r["output"])[:300]] for r in results]), flush=True)
"""


def load_sets(tasks: Path) -> dict[str, list[dict]]:
    """The real program tasks' test cases (from their task cards) and the synthetic sets, by name."""
    cards = json.loads(tasks.read_text())
    sets = {}
    for name in CODE_TASKS:
        cases = ast.literal_eval(cards[name]["eval_context"])["test_case"]
        sets[name] = [cases] if isinstance(cases, dict) else cases
    return {**sets, **SYNTHETIC}


def jobs(sets: dict[str, list[dict]]) -> list[tuple[str, str]]:
    return [(p, s) for p in PROGRAMS for s in sets if p not in SLOW_PROGRAMS or s in SLOW_SETS]


def run_official(official: Path, sets: dict, todo: list[tuple[str, str]]) -> list[list]:
    """Per job, [[passed, output], ...] from the official CodeTester, in a process of its own."""
    with tempfile.TemporaryDirectory() as root:
        pkg = Path(root) / "metrics" / "scoring"
        pkg.mkdir(parents=True)
        for init in (pkg.parent / "__init__.py", pkg / "__init__.py"):
            init.write_text("")
        (pkg / "program_judge.py").write_text(official.read_text())
        feed = "".join(json.dumps({"code": PROGRAMS[p], "cases": sets[s]}) + "\n" for p, s in todo)
        out = subprocess.run([sys.executable, "-c", _OFFICIAL, root], input=feed, capture_output=True, text=True,
                             check=True, cwd=root)
    return [json.loads(line) for line in out.stdout.splitlines()]


def run_ours(sets: dict, todo: list[tuple[str, str]]) -> list[list]:
    out = []
    for p, s in todo:
        verdicts = []
        for case in sets[s]:
            ok, output = run_case(PROGRAMS[p], case["input"])
            verdicts.append([ok and output == case["expected"].rstrip(), output[:300]])
        out.append(verdicts)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="the official program_judge.py")
    parser.add_argument("--tasks", type=Path, default=TASKS, help="task_metrics_from_task_examples.json")
    parser.add_argument("--out", type=Path, help="write every case's verdicts and outputs here (JSONL)")
    args = parser.parse_args()
    sets = load_sets(args.tasks)
    todo = jobs(sets)
    num_cases = sum(len(sets[s]) for _, s in todo)
    print(f"{len(PROGRAMS)} programs, {len(sets)} test-case sets ({sum(map(len, sets.values()))} cases): "
          f"{len(todo)} (program, set) jobs, {num_cases} cases")
    t0 = time.perf_counter()
    official = run_official(args.official, sets, todo)
    t1 = time.perf_counter()
    ours = run_ours(sets, todo)
    t2 = time.perf_counter()
    diffs, passed = [], [0, 0]
    rows = []
    for (p, s), off, our in zip(todo, official, ours, strict=True):
        for i, (a, b) in enumerate(zip(off, our, strict=True)):
            passed[0] += a[0]
            passed[1] += b[0]
            rows.append({"program": p, "set": s, "case": i, "official": a, "ours": b})
            if a[0] != b[0]:
                diffs.append(rows[-1])
    print(f"official: {passed[0]}/{num_cases} passed in {t1 - t0:.1f} s | ours (sandboxed): {passed[1]}/{num_cases} "
          f"passed in {t2 - t1:.1f} s ({1000 * (t2 - t1) / num_cases:.0f} ms a case) | {len(diffs)} differences")
    for d in diffs:
        print(f"  {d['program']} on {d['set']}[{d['case']}]: official {d['official']!r} | ours {d['ours']!r}")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
