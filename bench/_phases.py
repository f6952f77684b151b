"""Phase times of bench/bench_kernels_gpu.py: one step under torch.profiler, kernel time grouped into matmul,
each Triton kernel of kernels/ by name, casts/copies/elementwise and other (with the largest other kernel named)."""

import re
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

PHASES = ("matmul", "triton", "casts/copies/elementwise", "other")
_MATMUL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|s16816|s1688|^aten::(mm|addmm|bmm|matmul|linear)$", re.I)
_ELEMENTWISE = re.compile(r"elementwise|copy|memcpy|memset|fill|cast|"
                          r"^aten::(_?to(_copy)?|copy_|mul_?|add_?|sub_?|div_?|neg|exp|where|clamp|zero_|"
                          r"masked_fill_?)$", re.I)


def triton_kernel_names() -> set[str]:
    """Every `def _..._kernel(` in kernels/ (the names Triton launches under), read at run time so kernels added
    by later changes are grouped too."""
    names = set()
    for path in (REPO / "kernels").glob("*.py"):
        names.update(re.findall(r"^\s*def (_\w+_kernel)\(", path.read_text(), flags=re.M))
    return names


def classify(name: str, triton_names: set[str]) -> str:
    if name in triton_names:
        return "triton"
    if _MATMUL.search(name):
        return "matmul"
    if _ELEMENTWISE.search(name):
        return "casts/copies/elementwise"
    return "other"


def _event_us(evt, cuda: bool) -> float:
    # Kernel events are leaves, so self time is their duration; the attribute was renamed cuda -> device in 2.4.
    names = ("self_device_time_total", "self_cuda_time_total", "device_time_total") if cuda else (
        "self_cpu_time_total",)
    for attr in names:
        val = getattr(evt, attr, None)
        if val is not None:
            return float(val)
    return 0.0


def phase_times(call: Callable, cuda: bool, triton_names: set[str]) -> dict:
    """Run `call` once under torch.profiler; ms per phase group, per Triton kernel, and the largest 'other'."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    groups = dict.fromkeys(PHASES, 0.0)
    per_triton: dict[str, float] = {}
    others: dict[str, float] = {}
    for evt in prof.key_averages():
        is_kernel = str(getattr(evt, "device_type", "")).endswith("CUDA")
        if is_kernel != cuda:  # GPU: kernels only; CPU mode: CPU ops only
            continue
        ms = _event_us(evt, cuda) / 1e3
        group = classify(evt.key, triton_names)
        groups[group] += ms
        if group == "triton":
            per_triton[evt.key] = per_triton.get(evt.key, 0.0) + ms
        elif group == "other":
            others[evt.key] = others.get(evt.key, 0.0) + ms
    if cuda and not any(groups.values()):
        raise RuntimeError("the profiler recorded no CUDA kernels (CUPTI unavailable?)")
    top = max(others.items(), key=lambda kv: kv[1]) if others else ("-", 0.0)
    return dict(groups=groups, triton=per_triton, other_top=top[0][:60], other_top_ms=top[1])


def print_phases(results: dict, cpu: bool) -> None:
    phases = [r["phase"] for r in results.values() if r["phase"]]
    unit = "CPU self time" if cpu else "CUDA kernel time"
    print(f"\nphase times ({unit}, one profiled step of the fastest recompute/onepass config, ms)")
    print("| op | config | step p50 ms | matmul | triton | triton kernels | casts/copies/elementwise | other | "
          "largest other |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ph in phases:
        g = ph["groups"]
        tk = ", ".join(f"{k} {v:.2f}" for k, v in sorted(ph["triton"].items())) or "-"
        print(f"| {ph['op']} | {ph['config']} | {ph['ms_p50']:.2f} | {g['matmul']:.2f} | {g['triton']:.2f} | {tk} | "
              f"{g['casts/copies/elementwise']:.2f} | {g['other']:.2f} | {ph['other_top']} {ph['other_top_ms']:.2f} |")
