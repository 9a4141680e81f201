"""Build script for pyfastnn: compiles the C++ (and, when available, CUDA) kernels into pyfastnn._C.

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the torch
that will import it (see pyproject.toml). Environment knobs:

- ``PYFASTNN_CUDA=0`` builds CPU-only; ``PYFASTNN_CUDA=1`` requires the CUDA backend (fails loudly if
  torch has no CUDA or no complete toolkit is found); unset: CUDA when both are available, else the
  CPU backend (with a warning when only part of a CUDA setup was found).
- ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default here: 8.0 9.0+PTX).
- ``MAX_JOBS`` caps parallel compile jobs (ninja).
- ``PYFASTNN_DEBUG_INFO=1`` builds the C++ code with debug information (``-g``); without it the
  extension is built with ``-g0`` (overriding the ``-g`` of Python's own compile flags): about 1.5 MB
  instead of 34 MB.

The sources and compiler flags come from cmake/sources.json, which the CMake build reads too. The CPU
kernels are compiled once per CPU capability with per-file flags (NOTE [ Linking AVX and non-AVX
files ] in csrc/cpu/dispatch.cpp).
"""

from __future__ import annotations

import ast
import copy
import functools
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def package_constant(module: str, name: str):
    """A constant the package defines (``NAME = <literal>`` in pyfastnn/<module>.py), read without
    importing the package, which needs the extension this script builds."""
    tree = ast.parse((ROOT / "pyfastnn" / f"{module}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise LookupError(f"pyfastnn/{module}.py defines no constant {name}")


VERSION = package_constant("_version", "__version__")
BUILD_CONFIG = json.loads((ROOT / "cmake" / "sources.json").read_text())
INSTALL_COMMAND = package_constant("extension", "INSTALL_COMMAND")
EDITABLE_COMMAND = package_constant("extension", "EDITABLE_COMMAND")
RECORD_SUFFIX = package_constant("extension", "RECORD_SUFFIX")


def import_torch():
    """torch and its cpp_extension, or exit at once saying what to run.

    torch is deliberately not a build requirement in pyproject.toml: pip's isolated build would
    install the newest torch from the index (a multi-GB CUDA wheel) into a throwaway environment and
    compile against it, so the extension would not match the torch that imports it. Without torch
    there, an isolated build stops here within seconds instead.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        sys.exit(
            f"pyfastnn compiles its kernels against the torch installed in the environment it installs "
            f"into, and this build sees no torch ({error}). Install torch into that environment first if "
            f"it has none, then build without pip's default isolation (an isolated build never sees it):\n\n"
            f"    {INSTALL_COMMAND}        (or, editable: {EDITABLE_COMMAND})\n\n"
            f"(the environment needs setuptools and wheel, and ninja for a parallel build: "
            f"pip install setuptools wheel ninja)"
        )
    return torch, cpp_extension


def torch_requirement(torch_version: str) -> str:
    """The torch the package requires: the release its extension is compiled against (torch's C++ ABI
    changes between releases). A local tag (+cpu, +cu130) names a build of that release and is
    dropped, except a source build's (+git...), which pins that very commit.

    Example:
        >>> torch_requirement("2.13.0+cpu"), torch_requirement("2.13.0a0+git1234abc")
        ('torch==2.13.0', 'torch==2.13.0a0+git1234abc')
    """
    release, _, local = torch_version.partition("+")
    return f"torch=={torch_version}" if local.startswith("git") else f"torch=={release}"


def sources(patterns: list[str]) -> list[str]:
    """Repository-relative paths matching the globs, sorted."""
    found = {os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(str(ROOT / pattern))}
    return sorted(found)


@functools.lru_cache(maxsize=None)
def is_gcc(compiler: str) -> bool:
    """Whether the compiler command is GCC (the gcc_* flag lists apply to it alone)."""
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return "clang" not in banner.lower() and ("gcc" in banner.lower() or "free software foundation" in banner.lower())


def openmp_flags(gcc: bool, platform_name: str, aten_config: str, torch_lib: Path) -> tuple[list[str], list[str]]:
    """(compile, link) flags that make at::parallel_for an OpenMP loop on torch's own runtime.

    ATen's parallel_for is header code: compiled without OpenMP it is a serial loop. With GCC on Linux
    and a torch whose ATen runs on OpenMP (``aten_config``, the text of its ATen/Config.h, defines
    AT_PARALLEL_OPENMP 1, as CMake reads it too), the sources get ``-fopenmp`` and the extension links the
    libgomp torch ships (its soname, hashed in some wheels, is the one already loaded with torch), or
    the compiler's where torch ships none; anything else (clang's libomp beside torch's libgomp, another
    backend) would start a second runtime, so it builds serial loops (cmake/sources.json).

    Example:
        >>> openmp_flags(True, "linux", "#define AT_PARALLEL_OPENMP 1", Path("/nonexistent"))
        (['-fopenmp'], ['-fopenmp'])
        >>> openmp_flags(False, "linux", "#define AT_PARALLEL_OPENMP 1", Path("/nonexistent"))
        ([], [])
    """
    flags = list(BUILD_CONFIG["gcc_openmp_flags"])
    aten_on_openmp = re.search(r"^#define AT_PARALLEL_OPENMP 1", aten_config, re.MULTILINE) is not None
    if not (gcc and platform_name.startswith("linux") and aten_on_openmp):
        return [], []
    shipped = sorted(torch_lib.glob("libgomp*.so*"))
    return flags, [str(shipped[0])] if shipped else list(flags)


def cpu_capabilities(machine: str, compiler_type: str) -> list[dict]:
    """The CPU capabilities to compile kernels for: x86-64 gets the AVX ones (GCC/clang flags)."""
    x86_64 = machine.lower() in ("x86_64", "amd64")
    return [c for c in BUILD_CONFIG["cpu_capabilities"]
            if not c["x86_64_only"] or (x86_64 and compiler_type == "unix")]


def cuda_toolkit_problem(cuda_home: Optional[str]) -> Optional[str]:
    """Why the CUDA toolkit at cuda_home cannot build the extension, or None if it looks complete."""
    if not cuda_home:
        return "no CUDA toolkit found (set CUDA_HOME)"
    home = Path(cuda_home)
    if not os.access(home / "bin" / "nvcc", os.X_OK):
        return f"{home / 'bin' / 'nvcc'} is missing"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"the CUDA toolkit at {home} has no include/cuda_runtime.h"
    libraries = [home / lib / name for lib in ("lib64", "lib") for name in ("libcudart.so", "libcudart_static.a")]
    if not any(p.exists() for p in libraries):
        return f"the CUDA toolkit at {home} has no lib64/libcudart.so"
    return None


def find_cuda_home(torch_guess: Optional[str]) -> Optional[str]:
    """torch's CUDA_HOME, or (torch without CUDA does not look) the toolkit a user would point it at."""
    if torch_guess:
        return torch_guess
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


# The CUDA backend reads torch's matmul precision settings through at::Float32Backend and
# at::CuBLASReductionOption, which torch has since 2.10.
MIN_TORCH_FOR_CUDA = (2, 10)


def want_cuda(choice: str, torch_cuda: Optional[str], cuda_home: Optional[str],
              have_sources: bool, *, torch_version: str) -> tuple[bool, Optional[str]]:
    """Whether to build the CUDA backend, and a warning to show when a CUDA setup was half found.

    choice is PYFASTNN_CUDA ("0", "1" or ""); exits with the reason when "1" cannot be honoured, and
    on any other value (a "true" or "off" taken for unset would build what the user did not ask for).
    """
    if choice not in ("", "0", "1"):
        sys.exit(f"PYFASTNN_CUDA must be 0 (CPU only), 1 (CUDA required) or unset (CUDA where available), got {choice!r}")
    if choice == "0":
        return False, None
    problems = []
    if not torch_cuda:
        problems.append("this torch is built without CUDA")
    elif tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups()) < MIN_TORCH_FOR_CUDA:
        problems.append(f"the CUDA backend needs torch >= {'.'.join(map(str, MIN_TORCH_FOR_CUDA))}, "
                        f"this is {torch_version}")
    toolkit = cuda_toolkit_problem(cuda_home)
    if toolkit:
        problems.append(toolkit)
    if not have_sources:
        problems.append("no CUDA sources")
    if not problems:
        return True, None
    if choice == "1":
        sys.exit(f"PYFASTNN_CUDA=1 but the CUDA backend cannot be built: {'; '.join(problems)}")
    # Only part of a CUDA setup (an nvcc on PATH, a CUDA torch without toolkit, ...): say why the
    # CPU backend is built instead of failing later at compile or link time.
    half_found = bool(torch_cuda) or bool(cuda_home)
    warning = (f"building the CPU backend only: {'; '.join(problems)} "
               f"(set PYFASTNN_CUDA=0 to silence this, PYFASTNN_CUDA=1 to require CUDA)") if half_found else None
    return False, warning


# The CUDA library headers torch's CUDA headers include (ATen/cuda/CUDAContextLight.h).
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def cuda_include_dirs(cuda_home: str, site_dirs: Sequence[str]) -> list[str]:
    """The include folders a CUDA build adds before torch's own, in search order.

    A toolkit with every header in CUDA_LIBRARY_HEADERS needs none. Some toolkits ship without the
    cuBLAS/cuSPARSE/cuSOLVER headers; the CUDA torch wheels' nvidia-* packages (in site_dirs) have
    them, but also a whole CUDA runtime's headers of the wheel's own release (13.2 for torch 2.15),
    which nvcc refuses beside another release's compiler ("CUDA compiler and CUDA toolkit headers
    are incompatible"). So the toolkit's own folder comes first and the packages only fill its gaps.
    """
    toolkit = os.path.join(cuda_home, "include")
    if all(os.path.isfile(os.path.join(toolkit, name)) for name in CUDA_LIBRARY_HEADERS):
        return []
    packages = set()
    for site in site_dirs:
        packages.update(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [toolkit] + sorted(d for d in packages if os.path.isdir(d))


def build_record_path(extension_path: str) -> str:
    """Where the build records the torch it compiled against: beside the extension, where
    pyfastnn/extension.py's record_path looks (``_C.cpython-311-x86_64-linux-gnu.so`` ->
    ``_C.cpython-311-x86_64-linux-gnu.json``)."""
    return str(Path(extension_path).with_suffix(RECORD_SUFFIX))


def extension_and_command():
    torch, cpp_extension = import_torch()

    class BuildExtensionPerCapability(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the CPU kernels compiled once per capability with that
        capability's flags (setuptools has no per-file flags), linked after the other objects, and a
        record of the torch the extension was compiled against."""

        def build_extension(self, ext) -> None:
            gcc = is_gcc(cpp_extension.get_cxx_compiler())
            kernel_objects = []
            for capability in ext.cpu_capabilities:
                flags = capability["flags"] + (capability["gcc_flags"] if gcc else [])
                extra = copy.deepcopy(ext.extra_compile_args)
                if isinstance(extra, dict):
                    extra["cxx"] = extra["cxx"] + flags
                else:
                    extra = extra + flags
                # One folder per capability: the objects of one source must not overwrite each other.
                kernel_objects += self.compiler.compile(
                    ext.cpu_kernel_sources,
                    output_dir=os.path.join(self.build_temp, "cpu_capability", capability["name"]),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs=extra, depends=ext.depends,
                )
            own_objects = ext.extra_objects
            ext.extra_objects = list(own_objects or []) + kernel_objects  # linked last, in capability order
            try:
                super().build_extension(ext)
            finally:
                ext.extra_objects = own_objects
            record = {"torch": torch.__version__, "cuda": ext.cuda_version,
                      "cpu_capabilities": [c["name"] for c in ext.cpu_capabilities], "debug_info": ext.debug_info}
            Path(build_record_path(self.get_ext_fullpath(ext.name))).write_text(json.dumps(record) + "\n")

        def copy_extensions_to_source(self) -> None:  # --inplace and editable installs
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                shutil.copyfile(build_record_path(regular_file), build_record_path(inplace_file))

    gcc = is_gcc(cpp_extension.get_cxx_compiler())
    cxx_flags = ["-O3", "-fvisibility=hidden"] + BUILD_CONFIG["cxx_flags"] + (BUILD_CONFIG["gcc_cxx_flags"] if gcc else [])
    torch_root = Path(torch.__file__).parent
    openmp_compile, openmp_link = openmp_flags(gcc, sys.platform, (torch_root / "include/ATen/Config.h").read_text(),
                                               torch_root / "lib")
    cxx_flags += openmp_compile
    # Python's CFLAGS usually carry -g, which would ship ~30 MB of DWARF in every wheel; the last of
    # -g / -g0 wins, so the choice is made here whatever those flags say.
    debug_choice = os.environ.get("PYFASTNN_DEBUG_INFO", "").strip()
    if debug_choice not in ("", "0", "1"):
        sys.exit(f"PYFASTNN_DEBUG_INFO must be 1 (debug information), 0 or unset, got {debug_choice!r}")
    debug_info = debug_choice == "1"
    cxx_flags += ["-g"] if debug_info else ["-g0"]
    kernel_sources = sources(BUILD_CONFIG["cpu_kernels"])
    cxx_sources = [s for s in sources(BUILD_CONFIG["cxx_sources"]) if s not in kernel_sources]
    cuda_sources = sources(BUILD_CONFIG["cuda_sources"])
    capabilities = cpu_capabilities(platform.machine(), "unix" if os.name == "posix" else os.name)
    define_macros = [("PYFASTNN_VERSION", f'"{VERSION}"')]
    define_macros += [(BUILD_CONFIG["cpu_capability_define"] + c["name"], None) for c in capabilities]

    cuda_home = find_cuda_home(cpp_extension.CUDA_HOME)
    with_cuda, warning = want_cuda(os.environ.get("PYFASTNN_CUDA", "").strip(), torch.version.cuda, cuda_home,
                                   bool(cuda_sources), torch_version=torch.__version__)
    if warning:
        print(f"WARNING: pyfastnn: {warning}", file=sys.stderr)  # setuptools filters warnings.warn
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros += [("PYFASTNN_WITH_CUDA", None), ("PYFASTNN_CUDA_ARCHS", f'"{archs}"')]
        extension = cpp_extension.CUDAExtension(
            "pyfastnn._C", cxx_sources + cuda_sources,
            include_dirs=[str(ROOT / "csrc")] + cuda_include_dirs(cuda_home, sys.path),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp_link, define_macros=define_macros,
        )
    else:
        extension = cpp_extension.CppExtension(
            "pyfastnn._C", cxx_sources, include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp_link, define_macros=define_macros,
        )
    extension.cpu_kernel_sources = kernel_sources
    extension.cpu_capabilities = capabilities
    extension.cuda_version = torch.version.cuda if with_cuda else None
    extension.debug_info = debug_info
    return extension, BuildExtensionPerCapability


if __name__ == "__main__":  # also how pip's setuptools backend runs this file; tests import the helpers
    extension, build_ext = extension_and_command()
    lesson_requires = list(package_constant("extras", "LESSON_REQUIREMENTS"))  # checked at pyfastnn.lesson's import
    setup(
        name="pyfastnn",
        version=VERSION,
        description="Fused Linear+activation kernels (CPU and CUDA) for PyTorch, as drop-in layers",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
        long_description_content_type="text/markdown",
        license="MIT",
        python_requires=">=3.10",
        packages=find_packages(include=["pyfastnn", "pyfastnn.*"]),  # the library and pyfastnn.lesson
        # The library needs torch alone, the release the extension is compiled against; the lesson
        # (pyfastnn train / demo) is an extra.
        install_requires=[torch_requirement(import_torch()[0].__version__)],
        # onnxscript + onnxruntime: the test that a decomposed program converts to ONNX and runs there.
        extras_require={"lesson": lesson_requires,
                        "test": ["pytest", "pytest-xdist", "hypothesis", "expecttest", "onnxscript", "onnxruntime",
                                 *lesson_requires]},
        ext_modules=[extension],
        cmdclass={"build_ext": build_ext},
        entry_points={"console_scripts": ["pyfastnn = pyfastnn.cli:run"]},
        zip_safe=False,
    )
