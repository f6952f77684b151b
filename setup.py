"""Install the `engine` and `kernels` packages and build the optional csrc extension.

    pip install -e ".[dev]" --no-build-isolation     # development (what `make` does)

Two optional extensions from csrc/packing: `kernels._packing` (C++, built whenever a compiler exists) and
`kernels._packing_cuda` (compiled with nvcc when nvcc and a static CUDA runtime are found). A failed or skipped
build is a printed warning, never a failed install; `kernels.packing` then falls back to its Python reference
and logs that once.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = Path(__file__).parent
PACKING = Path("csrc") / "packing"
# Real GPUs we target (A100, H100/H200) plus PTX for newer ones, which the driver JIT-compiles.
NVCC_ARCH = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
             "-gencode=arch=compute_90,code=compute_90"]

try:  # pybind11's build_ext picks the newest C++ standard the compiler supports
    from pybind11.setup_helpers import build_ext as _build_ext
except ImportError:
    _build_ext = _setuptools_build_ext


def _cuda_home(nvcc: str) -> Path | None:
    """The toolkit root holding libcudart_static (nvcc may be a wrapper script outside it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(os.path.realpath(nvcc)).parents[1])]
    for c in filter(None, candidates):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (Path(c) / lib / "libcudart_static.a").exists():
                return Path(c)
    return None


class BuildExt(_build_ext):
    """Compiles an extension's `cuda_sources` with nvcc first; any failure skips that extension with a warning."""

    def build_extension(self, ext):
        cuda_sources = getattr(ext, "cuda_sources", [])
        if cuda_sources:
            try:
                ext.extra_objects = [self._nvcc(src) for src in cuda_sources]
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"setup.py: WARNING: nvcc failed ({e}); skipping {ext.name}, CUDA tensors will use the "
                      "Python reference in kernels/packing.py")
                return
        super().build_extension(ext)

    def _nvcc(self, src: str) -> str:
        obj = Path(self.build_temp) / (src + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        deps = [Path(src), PACKING / "pack.h"]
        if not self.force and obj.exists() and all(obj.stat().st_mtime >= d.stat().st_mtime for d in deps):
            return str(obj)  # up to date: nvcc takes ~25 s for three architectures
        cmd = [shutil.which("nvcc"), "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
               *NVCC_ARCH, "-I", str(PACKING), "-c", src, "-o", str(obj)]
        print("setup.py:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        return str(obj)


def _extensions() -> list:
    """kernels._packing (C++, always) and kernels._packing_cuda (nvcc + static cudart, only where nvcc exists).

    Both are optional=True: a failed compile or link prints a warning and the install goes on; kernels/packing.py
    then uses its Python reference (and logs that once)."""
    if not (ROOT / PACKING / "pack.cpp").exists():
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
    exts = [Pybind11Extension("kernels._packing", [str(PACKING / "bindings.cpp"), str(PACKING / "pack.cpp")],
                              cxx_std=17, optional=True, depends=[str(PACKING / "pack.h")])]
    nvcc = shutil.which("nvcc")
    home = _cuda_home(nvcc) if nvcc else None
    if nvcc is None or home is None:
        print(f"setup.py: {'no nvcc on PATH' if nvcc is None else 'no libcudart_static.a found'}; skipping "
              "kernels._packing_cuda (CUDA tensors will use the Python reference)")
        return exts
    # Static cudart: the module imports on machines without libcudart and needs only the driver at call time.
    cuda = Pybind11Extension("kernels._packing_cuda", [str(PACKING / "bindings_cuda.cpp")], cxx_std=17,
                             optional=True, depends=[str(PACKING / "pack.h"), str(PACKING / "pack.cu")],
                             libraries=["cudart_static", "dl", "rt", "pthread"],
                             library_dirs=[str(home / d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                                           if (home / d).is_dir()])
    cuda.cuda_sources = [str(PACKING / "pack.cu")]
    return [*exts, cuda]


setup(
    name="specs-engine",
    version="0.1.0",
    description="RL and preference training of vision-language models: the SPECS pipeline on Qwen2.5-VL",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17,<5.20",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "datasets>=4.0",
        "numpy>=1.26",
        "pillow>=10",
        "math-verify>=0.9",  # symbolic answers in the accuracy reward (engine/rewards.py)
        "matplotlib>=3.8",  # the evaluation report's plots (engine/report.py)
        "opencv-python-headless>=4.8",  # MEGA-Bench video frames (engine/benchmarks/video.py)
        "jieba>=0.42",  # MEGA-Bench's Chinese GLEU segments words with it (engine/benchmarks/megabench_gleu.py)
        "nltk>=3.9",  # MEGA-Bench's constrained generation (engine/benchmarks/megabench_constrained.py) ...
        "pronouncing>=0.3",  # ... and its syllables and rhymes (CMUdict; 0.2 needs pkg_resources)
    ],
    extras_require={
        "vllm": ["vllm>=0.32"],
        "flash": ["flash-attn>=2.7"],
        # kernels/integrations/trl.py subclasses TRL's trainers and relies on 1.16's internals (its fused-head
        # call, _compute_loss): pinned to the minor version its tests ran against. verl has no extra: its metadata
        # pins transformers<5.11 (`make test-verl` installs it --no-deps in its own venv).
        "trl": ["trl>=1.16,<1.17"],
        "tensorboard": ["tensorboard>=2.16"],
        "wandb": ["wandb>=0.19"],
        # tensorboardX: a 3 MB TensorBoard event writer, so the tests read real event files back.
        "dev": ["pytest>=8", "ruff>=0.15", "pybind11>=2.12", "trl>=1.16,<1.17",
                "tensorboardX>=2.6"],
    },
    # Installed commands (in .venv/bin after `make venv`): the same as the module entry points.
    entry_points={"console_scripts": [
        "specs-train = engine.train:cli",  # python engine/train.py RECIPE; torchrun takes the script path
        "specs-eval = engine.eval:cli",  # python -m engine.eval --model ... --benchmarks ...
        "specs-config = engine.config:main",  # python -m engine.config RECIPE: the resolved config
        "specs-plan = engine.plan:main",  # python -m engine.plan RECIPE --gpus 8 --gpu-memory 80: the memory plan
    ]},
)
