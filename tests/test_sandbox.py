"""The code sandbox (engine/sandbox.py, engine/seccomp.py) against the attacks a model-written program can make on
MEGA-Bench's program_judge (engine/benchmarks/megabench_code.py), and its refusal where no sandbox can be made.

The attack tests need bubblewrap (`apt-get install -y bubblewrap`; .ci/run installs it); without it they are
skipped, naming it, and the refusal tests still run."""

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine import sandbox, seccomp
from engine.benchmarks import megabench_code as mc

needs_sandbox = pytest.mark.skipif(sandbox.problem() is not None,
                                   reason=f"bubblewrap sandbox not usable here: {sandbox.problem()}")
CASE = {"input": ["21:11"], "expected": "9:11 PM"}


def _host_processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes on this machine whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(int(pid))
    return found


@needs_sandbox
def test_parent_environment_is_out_of_reach(monkeypatch):
    """The program neither inherits our environment nor reads it through /proc/<our pid>/environ."""
    monkeypatch.setenv("GEMINI_API_KEY", "sk-sandbox-test-secret")
    code = (f"import os\nfound = [str(dict(os.environ))]\n"
            f"for pid in [{os.getpid()}, {os.getppid()}] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
            f"    try:\n        found.append(open(f'/proc/{{pid}}/environ').read())\n"
            f"    except OSError as e:\n        found.append(repr(e))\n"
            f"print(found, sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    ok, out = mc.run_case(code, [])
    assert ok, out
    assert "sk-sandbox-test-secret" not in out
    assert out.endswith("['1', '2']")  # its own PID namespace: bwrap's init and itself


@needs_sandbox
def test_writes_outside_its_folder_fail():
    # Not under /tmp, which the sandbox replaces with its own: a folder of ours, which it cannot even see.
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        target = Path(folder) / "escaped.txt"
        ok, out = mc.run_case(f"open({str(target)!r}, 'w').write('x')", [])
        assert not ok and "No such file or directory" in out
        assert not target.exists()
    ok, out = mc.run_case(f"open({sys.prefix + '/escaped.txt'!r}, 'w').write('x')", [])  # a folder it does see
    assert not ok and "Read-only file system" in out
    assert not Path(sys.prefix, "escaped.txt").exists()
    ok, out = mc.run_case("import os\nopen('here.txt', 'w').write('x')\nprint(os.getcwd(), os.listdir())", [])
    assert ok and out == f"{sandbox.WORKDIR} ['here.txt']"  # its own folder is writable


@needs_sandbox
def test_our_files_are_not_visible():
    """Only system folders and the Python installation are in its view: not the repo, the benchmark's expected
    outputs, home folders or checkpoints."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    ok, out = mc.run_case(f"import os\nprint(os.path.exists({str(readme)!r}), os.path.exists(os.path.expanduser('~'))"
                          f", sorted(os.listdir('/tmp')))", [])
    # A Python installation that lives under /tmp (a CI checkout's venv) is bound there, read-only: its top folder
    # shows next to the program's own.
    under_tmp = {Path(p).parts[2] for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable))
                 if Path(p).parts[:2] == ("/", "tmp") and len(Path(p).parts) > 2}
    assert ok and out == f"False False {sorted({'sandbox'} | under_tmp)}"
    ok, out = mc.run_case("import numpy, json\nprint(int(numpy.arange(4).sum()))", [])  # its libraries are
    assert ok and out == "6"


@needs_sandbox
def test_no_network_not_even_to_us():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        ok, out = mc.run_case(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
                              f".sendall(b'key')\nprint('sent')", [])
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert not ok and "sent" not in out


@needs_sandbox
def test_setsid_escape_leaves_nothing_behind():
    """fork + setsid + fork used to survive the end of the case, reparented to PID 1."""
    marker = f"sandbox-escape-{os.getpid()}-{time.time_ns()}"
    code = (f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
            f"    os._exit(0)\nprint('forked')")
    ok, out = mc.run_case(code, [])
    assert not ok and "forked" not in out  # no process may be started at all
    time.sleep(0.5)
    assert _host_processes_with(marker) == []


@needs_sandbox
def test_fork_bomb_cannot_start():
    start = time.perf_counter()
    ok, out = mc.run_case("import os\nwhile True:\n    os.fork()", [])
    assert not ok and "Errno 11" in out
    assert time.perf_counter() - start < 10
    ok, out = mc.run_case("import subprocess\nprint(subprocess.run(['true']).returncode)", [])
    assert not ok  # no processes of any kind (a documented difference from the official evaluator)
    ok, out = mc.run_case("import threading\nt = threading.Thread(target=print, args=('t',))\nt.start()\nt.join()", [])
    assert ok and out == "t"  # threads still work


@needs_sandbox
def test_forged_result_is_not_a_pass():
    """A program can reach anything in its own process (the harness, its real stdout); it passes only by printing
    the expected output and exiting normally, never by writing a result and then dying."""
    forged_old = ("import __main__, json, os\nm = __main__\n"
                  "m.real_stdout.write('\\n' + m.job['token'] + json.dumps({'output': '9:11 PM'}) + '\\n')\n"
                  "m.real_stdout.flush()\nos._exit(1)")
    assert mc.program_judge(forged_old, {"test_case": CASE}) == 0
    forged = "import __main__, os\nos.write(__main__.result_fd, b'9:11 PM')\nos._exit(1)"
    assert mc.program_judge(forged, {"test_case": CASE}) == 0
    raised = "print('9:11 PM')\nraise SystemExit(0)"
    assert mc.program_judge(raised, {"test_case": CASE}) == 0


@needs_sandbox
def test_time_limit_cannot_be_caught(monkeypatch):
    monkeypatch.setattr(mc, "TIMEOUT_S", 0.5)
    code = "try:\n    while True:\n        pass\nexcept BaseException:\n    pass\nprint('9:11 PM')"
    start = time.perf_counter()
    assert mc.program_judge(code, {"test_case": CASE}) == 0
    ignored = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" + code
    assert mc.program_judge(ignored, {"test_case": CASE}) == 0
    assert time.perf_counter() - start < 8


@needs_sandbox
def test_memory_and_disk_are_bounded():
    ok, out = mc.run_case("b = bytearray(6 << 30)\nprint(len(b))", [])
    assert not ok and "MemoryError" in out
    # Its folder is a tmpfs of Limits.tmp_bytes (memory, freed at the end), files at most Limits.file_bytes.
    fill = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (15 << 20))\nprint('filled')"
    ok, out = mc.run_case(fill, [])
    assert not ok and "No space left on device" in out


@needs_sandbox
def test_sandbox_exit_status_and_start_clock():
    r = sandbox.run_python("import os\nstarted()\nos._exit(7)", b"", timeout_s=2)
    assert (r.exit_code, r.timed_out) == (7, False)
    r = sandbox.run_python("import sys\nstarted()\nsys.stdout.write(sys.stdin.read())", b"echo", timeout_s=2)
    assert (r.exit_code, r.stdout) == (0, b"echo")
    with pytest.raises(RuntimeError, match="did not start the program within 0.5 s"):  # never a verdict
        sandbox.run_python("import time\ntime.sleep(5)\nstarted()", b"", timeout_s=2, startup_s=0.5)
    with pytest.raises(RuntimeError, match="(?s)did not start the program .*exit code 1.*ZeroDivisionError"):
        sandbox.run_python("1 / 0\nstarted()", b"", timeout_s=2)


def test_no_sandbox_refuses_to_run_code(monkeypatch, tmp_path):
    """Without bwrap the program is never run; the error names the fix."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.problem.cache_clear()
    try:
        assert "not installed" in sandbox.problem()
        target = tmp_path / "ran.txt"
        with pytest.raises(RuntimeError, match="apt-get install -y bubblewrap"):
            mc.run_case(f"open({str(target)!r}, 'w').write('x')", [])
        assert not target.exists()
    finally:
        sandbox.problem.cache_clear()


def test_unknown_architecture_has_no_filter(monkeypatch):
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
    assert "riscv64" in seccomp.supported()
    with pytest.raises(RuntimeError, match="riscv64"):
        seccomp.build()


def test_seccomp_filter_shape():
    prog = seccomp.build()
    assert len(prog) % 8 == 0 and len(prog) // 8 < 255  # classic BPF jumps are one byte
    assert sys.platform == "linux"


@needs_sandbox
def test_seccomp_refuses_kernel_interfaces():
    """Each refused call fails with EPERM inside the sandbox (without the filter, ptrace(TRACEME), unshare(0) and
    userfaultfd(0) would succeed, the others fail with other errors)."""
    names = ["ptrace", "unshare", "userfaultfd", "bpf", "io_uring_setup", "keyctl", "perf_event_open", "setns"]
    table = seccomp._ARCHES[seccomp.platform.machine()][1]
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nout = []\n"
            f"for nr in {[table[n] for n in names]}:\n"
            "    ctypes.set_errno(0)\n    r = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
            "    out.append((r, ctypes.get_errno()))\n"
            "print(out)")
    ok, out = mc.run_case(code, [])
    assert ok and out == str([(-1, 1)] * len(names))


def test_private_tmp_is_mounted_before_the_python_view():
    """A Python or venv under /tmp (a CI checkout there) must be bound on top of the private /tmp, not hidden by
    it: bwrap applies its mounts in order (CI failed with 'execvp /tmp/.../.venv/bin/python' before)."""
    argv = sandbox._bwrap_argv(sandbox.Limits(), 3)
    tmp = argv.index("/tmp")
    assert argv[tmp - 1] == "--tmpfs"
    assert tmp < argv.index("--ro-bind")
