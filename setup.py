"""Build script for pyfastnn: compiles the C++ (and, when available, CUDA) kernels into pyfastnn._C.

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the torch
that will import it, and an isolated build would fetch a fresh (multi-GB) torch instead of using the
one installed. Environment knobs:

- ``PYFASTNN_CUDA=0`` builds CPU-only; ``PYFASTNN_CUDA=1`` requires the CUDA backend (fails loudly if
  torch has no CUDA or no toolkit is found); unset: CUDA when both are available.
- ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default here: 8.0 9.0+PTX).
- ``MAX_JOBS`` caps parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "pyfastnn" / "_version.py").read_text()).group(1)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))


def _want_cuda() -> bool:
    choice = os.environ.get("PYFASTNN_CUDA", "").strip()
    cuda_sources = _sources("csrc/cuda/*.cu")
    available = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if choice == "0":
        return False
    if choice == "1":
        if not available:
            sys.exit(
                "PYFASTNN_CUDA=1 but the CUDA backend cannot be built: "
                f"torch CUDA={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}, "
                f"{len(cuda_sources)} CUDA sources"
            )
        return True
    return available


def _cuda_include_dirs() -> list[str]:
    # Toolkits without the cuBLAS/cuSPARSE headers: the CUDA torch wheels ship them as nvidia-* packages.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extension():
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi",
                 "-Wno-maybe-uninitialized"]  # GCC flags its own AVX-512 intrinsics headers
    define_macros = [("PYFASTNN_VERSION", f'"{VERSION}"')]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "pyfastnn._C", sources, include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags}, define_macros=define_macros,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    define_macros += [("PYFASTNN_WITH_CUDA", None), ("PYFASTNN_CUDA_ARCHS", f'"{archs}"')]
    return cpp_extension.CUDAExtension(
        "pyfastnn._C", sources + _sources("csrc/cuda/*.cu"),
        include_dirs=[str(ROOT / "csrc")] + _cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        define_macros=define_macros,
    )


setup(
    name="pyfastnn",
    version=VERSION,
    description="Fused Linear+activation kernels (CPU and CUDA) for PyTorch, as drop-in layers",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["pyfastnn", "pyfastnn.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "expecttest"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["pyfastnn = pyfastnn.cli:main"]},
    zip_safe=False,
)
