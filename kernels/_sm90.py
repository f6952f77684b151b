"""Static Hopper (sm_90a) checks of the Triton kernels, on a machine without a GPU.

`compile_sm90` compiles one kernel with one launch config for GPUTarget("cuda", 90, 32) and reads what the
interpreter cannot show: registers, spills, shared memory, and whether tl.dot became warpgroup MMA. The tools
(ptxas, cuobjdump) are the ones the triton wheel ships in triton/backends/nvidia/bin/; no CUDA install, driver or
GPU is needed. `collect` compiles every spec of the registries (`sm90_specs()` in each kernel module) in a small
pool of fresh processes; `format_table` prints the result. Used by tests/test_sm90_compile.py and
bench/sm90_report.py.

A spec is (fn, signature, constexprs, num_warps, num_stages, label): fn a plain Python kernel function or a
JITFunction; signature maps every argument to a Triton type ("*bf16", "i32", "fp32", "constexpr"), where a
":16" suffix ("*fp32:16", "i32:16") says the launcher's value is always a multiple of 16 (16-byte aligned for a
pointer); constexprs gives the value of every "constexpr" argument.

Triton is imported inside the functions, so importing this module never needs triton.
"""

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import re
import subprocess
import tempfile

SM90_SHARED_LIMIT = 232448  # 227 KiB: the most shared memory one block may use on H100 / H200
REGISTRY_MODULES = ("kernels._logprobs_triton", "kernels._onepass")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What one sm_90a compile produced: registers and stack from the cubin, spill_* from `ptxas -v`."""

    name: str  # the kernel function's name
    label: str  # the spec's label, unique within the registries
    config: str  # blocks, num_warps, num_stages and the other constexprs, compactly
    dtype: str  # the element types of the pointer arguments, in order, without repeats
    registers: int
    stack_bytes: int  # the cubin's stack frame (spill slots and any local arrays)
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # metadata.shared: the dynamic shared memory the launch asks for
    wgmma_ptx: bool  # "wgmma" in the PTX
    hgmma_sass: bool | None  # "HGMMA" in the SASS; None: not disassembled (no tl.dot, or wgmma in the PTX)
    uses_dot: bool  # the kernel's source calls tl.dot (so it should use warpgroup MMA on Hopper)
    num_warps: int
    num_stages: int

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def warpgroup_mma(self) -> bool:
        return self.wgmma_ptx or bool(self.hgmma_sass)


def _tool(name: str) -> str:
    """Path of a CUDA tool shipped in the triton wheel; RuntimeError if it is not there."""
    import triton.backends.nvidia

    path = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found at {path}: the sm_90a checks need the CUDA tools that the triton wheel "
                           "ships in triton/backends/nvidia/bin/ (a triton build without the NVIDIA backend?)")
    return path


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def _config_str(constexprs: dict, num_warps: int, num_stages: int) -> str:
    blocks = [str(v) for k, v in constexprs.items() if k.startswith("BLOCK")]
    rest = []
    for k, v in constexprs.items():
        if k.startswith("BLOCK") or v is False:
            continue
        rest.append(k if v is True else str(v))
    return " ".join(["x".join(blocks), f"w{num_warps}", f"s{num_stages}", *rest])


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                 label: str | None = None) -> KernelReport:
    """Compile `fn` for sm_90a with this signature, constexprs and launch config; return its KernelReport.

    Raises whatever triton.compile raises when the kernel does not compile, and RuntimeError when the CUDA tools
    are missing or fail. Must not run in a process that imported triton under TRITON_INTERPRET=1 (use `collect`).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    jit_fn = fn if isinstance(fn, triton.runtime.jit.JITFunction) else triton.jit(fn)
    if not isinstance(jit_fn, triton.runtime.jit.JITFunction):  # triton.jit gives an InterpretedFunction then
        raise RuntimeError("compile_sm90 cannot compile under TRITON_INTERPRET=1; use collect(), whose workers "
                           "import triton without it")
    src_fn = getattr(jit_fn, "fn", fn)
    # ":16" mirrors what Triton's launcher does at run time: an int that is a multiple of 16 and a 16-byte
    # aligned pointer are specialised with tt.divisibility=16, which lets the compiler vectorise the loads into
    # cp.async and software-pipeline them. Without the hint the same kernel compiles to different code (for the
    # log-probs forward: one stage, 48 KiB shared, 1,240-byte stack instead of three stages, 144 KiB, 216).
    sig, attrs = {}, {}
    for i, (arg, ty) in enumerate(signature.items()):
        ty, _, div = ty.partition(":")
        sig[arg] = ty
        if div:
            attrs[(i,)] = [["tt.divisibility", int(div)]]
    src = triton.compiler.ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs)
    # Triton runs ptxas with -v itself and prints the log when asked: keep it (on a cache hit there is none).
    log_buf = io.StringIO()
    old_dump = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log_buf):
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        triton.knobs.nvidia.dump_ptxas_log = old_dump
    name = kernel.metadata.name
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    uses_dot = "tl.dot(" in inspect.getsource(src_fn)
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    with tempfile.TemporaryDirectory(prefix="sm90_") as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        usage = _run([cuobjdump, "--dump-resource-usage", cubin_path])
        m = re.search(rf"Function {re.escape(name)}:\s*REG:(\d+) STACK:(\d+)", usage)
        if not m:
            raise RuntimeError(f"could not parse the resource usage of {name}:\n{usage}")
        regs, stack = int(m[1]), int(m[2])
        # wgmma in the PTX always becomes HGMMA; disassemble (0.5-2 s) only to look for HGMMA when it is not there.
        hgmma = "HGMMA" in _run([cuobjdump, "-sass", cubin_path]) if uses_dot and "wgmma" not in ptx else None
        # Spills: the cubin's STACK is the frame size. Zero means no spills (a spill needs a stack slot); a non-zero
        # frame may also hold local arrays, so then the exact bytes come from ptxas -v: the log of Triton's own
        # ptxas run when it compiled, else (a Triton cache hit) a second run with the flags Triton's make_cubin
        # passes (-lineinfo, --regAllocOptLevel=2, fmad). Either way the log must show the cubin's registers and
        # stack, or its spill numbers would not describe the cubin.
        stores = loads = 0
        if stack:
            log = log_buf.getvalue()
            if "spill stores" not in log:
                fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
                log = _run([ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", ptx_path,
                            "-o", os.path.join(tmp, "check.cubin")])
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            used = re.search(r"Used (\d+) registers", log)
            frame = re.search(r"(\d+) bytes stack frame", log)
            if not (spill and used and frame):
                raise RuntimeError(f"could not parse the ptxas -v log of {name}:\n{log}")
            if (int(used[1]), int(frame[1])) != (regs, stack):
                raise RuntimeError(f"{name}: ptxas -v reports {used[1]} registers / {frame[1]} B stack but the cubin "
                                   f"has {regs} / {stack}; its spill numbers would not describe the cubin")
            stores, loads = int(spill[1]), int(spill[2])
    dtypes = []
    for ty in sig.values():
        if ty.startswith("*") and ty[1:] not in dtypes:
            dtypes.append(ty[1:])
    return KernelReport(
        name=name, label=label or name, config=_config_str(constexprs, num_warps, num_stages), dtype=",".join(dtypes),
        registers=regs, stack_bytes=stack, spill_stores=stores, spill_loads=loads,
        shared_bytes=int(kernel.metadata.shared), wgmma_ptx="wgmma" in ptx, hgmma_sass=hgmma, uses_dot=uses_dot,
        num_warps=num_warps, num_stages=num_stages)


def spec_labels(modules=REGISTRY_MODULES) -> list[tuple[str, int, str]]:
    """(module, index, label) of every spec of the registries; labels are checked to be unique."""
    out = [(mod, i, spec[5]) for mod in modules for i, spec in enumerate(importlib.import_module(mod).sm90_specs())]
    labels = [label for _, _, label in out]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ValueError(f"sm90_specs labels must be unique, repeated: {sorted(dup)}")
    return out


def _worker_init():
    # The interpreter is chosen when triton is first imported (triton.language builds its helpers then), and a
    # test may have set TRITON_INTERPRET=1 in the parent: the workers import triton fresh, without it.
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_spec(module: str, index: int) -> KernelReport | str:
    """The report of one spec, or the error as a string (a compile error may not survive pickling)."""
    fn, signature, constexprs, num_warps, num_stages, label = importlib.import_module(module).sm90_specs()[index]
    try:
        return compile_sm90(fn, signature, constexprs, num_warps, num_stages, label=label)
    except Exception as e:  # noqa: BLE001 - any failure is the spec's result, reported by the caller
        return f"{type(e).__name__}: {e}"


def collect(modules=REGISTRY_MODULES, processes: int | None = None, raise_errors: bool = True) -> dict:
    """{label: KernelReport} of every spec of the registries, in registry order. With raise_errors=False a spec
    that fails to compile maps to its error message instead of raising RuntimeError.

    The compiles run in `processes` fresh spawned processes (default: min(2, CPUs)); 0 compiles in this process,
    which must then not have imported triton under TRITON_INTERPRET=1.
    """
    specs = spec_labels(modules)
    processes = min(2, os.cpu_count() or 1) if processes is None else processes
    if processes == 0:
        results = [_compile_spec(mod, i) for mod, i, _ in specs]
    else:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_init) as pool:
            results = list(pool.map(_compile_spec, [mod for mod, _, _ in specs], [i for _, i, _ in specs]))
    out = {}
    for (_, _, label), res in zip(specs, results, strict=True):
        if isinstance(res, str) and raise_errors:
            raise RuntimeError(f"sm_90a compile of {label!r} failed: {res}")
        out[label] = res
    return out


def format_table(reports) -> str:
    """A fixed-width table, one row per KernelReport (label, kernel, config, dtype, regs, stack, spills, smem KiB,
    wgmma); other items (error strings from `collect`) are skipped."""
    head = ("label", "kernel", "config", "dtype", "regs", "stack", "spills", "smem KiB", "wgmma")
    rows = [(r.label, r.name, r.config, r.dtype, str(r.registers), str(r.stack_bytes), str(r.spill_bytes),
             f"{r.shared_bytes / 1024:.1f}", ("yes" if r.warpgroup_mma else "no") + ("" if r.uses_dot else " (no dot)"))
            for r in reports if isinstance(r, KernelReport)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    numeric = {4, 5, 6, 7}
    lines = []
    for row in (head, tuple("-" * w for w in widths), *rows):
        cells = [x.rjust(w) if i in numeric else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
