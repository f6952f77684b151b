"""Install the `engine` and `kernels` packages and build the optional csrc extension.

    pip install -e ".[dev]" --no-build-isolation     # development (what `make` does)

The C++ packing extension (csrc/packing) is optional: with no sources or no compiler, the build skips it and
`kernels` falls back to its Python reference, logging that once.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _extensions() -> list:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "packing").glob("*.cpp"))
    if not sources:
        print("setup.py: csrc/packing has no C++ sources yet; skipping the extension")
        return []
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("setup.py: no C++ compiler found; skipping the extension (kernels uses the Python reference)")
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("setup.py: pybind11 is not installed; skipping the extension")
        return []
    # optional=True: a compile failure is a warning, not a failed install.
    return [Pybind11Extension("kernels._packing", sources, cxx_std=17, optional=True)]


setup(
    name="specs-engine",
    version="0.1.0",
    description="RL and preference training of vision-language models: the SPECS pipeline on Qwen2.5-VL",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    ext_modules=_extensions(),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17,<5.20",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "datasets>=4.0",
        "numpy>=1.26",
        "pillow>=10",
    ],
    extras_require={
        "vllm": ["vllm>=0.32"],
        "flash": ["flash-attn>=2.7"],
        "judge": ["google-genai>=3.6"],
        "dev": ["pytest>=8", "ruff>=0.15", "pybind11>=2.12", "google-genai>=3.6"],
    },
)
