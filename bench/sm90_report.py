"""Print the sm_90a static report (registers, spills, shared memory, wgmma) of every Triton kernel in kernels/,
compiled on the CPU with the tools in the triton wheel: python bench/sm90_report.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout: import kernels without install

if __name__ == "__main__":  # the guard: kernels._sm90.collect spawns worker processes that re-import this file
    from kernels import _sm90

    print(_sm90.format_table(_sm90.collect().values()))
