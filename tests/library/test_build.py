"""The build: every CPU kernel copy the CPU supports is compiled in and runs, the extension refuses a
torch it was not built against, and setup.py fails fast (or falls back to the CPU backend) with a
message that says what to do."""

import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyfastnn
from pyfastnn import extension

ROOT = Path(__file__).resolve().parents[2]
ATEN_NEEDS = {  # the CPU flags ATen asks for before it picks a capability (cpuinfo names)
    "AVX2": {"avx2", "fma"},
    "AVX512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no CPU flags (not an x86 CPU)")


def supported_capabilities() -> list:
    flags = cpu_flags()
    return ["DEFAULT"] + [name for name, needs in ATEN_NEEDS.items() if needs <= flags]


def load_setup_module():
    """setup.py's helpers, without running setup() (it runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("pyfastnn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(code: str, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernel copies")
def test_every_kernel_copy_the_cpu_supports_is_compiled():
    compiled = pyfastnn.info()["cpu_isas_compiled"]
    missing = [name for name in supported_capabilities() if name not in compiled]
    assert not missing, f"this CPU supports {missing} but the build has only {compiled} kernels"


KERNEL_CHECK = """
import torch, torch.nn.functional as F, pyfastnn
torch.manual_seed(0)
references = {"identity": lambda t: t, "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
              "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 3e-2)):
    for rows in (1, 3, 64):
        x, w, b = torch.randn(rows, 37, dtype=dtype), torch.randn(45, 37, dtype=dtype) / 6, torch.randn(45, dtype=dtype)
        for name in pyfastnn.ACTIVATIONS:
            ref = references.get(name, getattr(F, name, None))
            out = pyfastnn.fused_linear(x, w, b, activation=name)
            err = (out.double() - ref(F.linear(x.double(), w.double(), b.double()))).abs().max().item()
            assert err <= tol * 10, (name, dtype, rows, err)
print(pyfastnn.info()["cpu_isa"])
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_each_kernel_copy_follows_aten_and_matches_pytorch(capability):
    if capability not in pyfastnn.info()["cpu_isas_compiled"]:
        pytest.skip(f"no {capability} kernels in this build (x86-64 only)")
    if capability not in supported_capabilities():
        pytest.skip(f"this CPU cannot run {capability} code")  # ATen trusts ATEN_CPU_CAPABILITY blindly
    result = run_python(KERNEL_CHECK, ATEN_CPU_CAPABILITY=capability.lower())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == capability


def test_build_records_the_torch_it_compiled_against():
    record = extension.build_record()
    assert record is not None, "the build wrote no record beside the extension"
    assert record["torch"] == torch.__version__
    assert record["cpu_capabilities"] == pyfastnn.info()["cpu_isas_compiled"]
    assert pyfastnn.info()["torch_built_against"] == torch.__version__


@pytest.mark.parametrize("record, message", [
    ({"torch": "2.12.1", "cuda": None}, "built against torch 2.12.1, but torch 2.13.0+cpu is installed"),
    ({"torch": "2.13.0+cu128", "cuda": "12.8"}, "built with CUDA 12.8 against torch 2.13.0+cu128"),
])
def test_torch_mismatch_is_a_clear_import_error(record, message):
    with pytest.raises(ImportError, match="rebuild") as error:
        extension.check_built_for(record, "2.13.0+cpu", None)
    assert message in str(error.value) and "pip install --no-build-isolation" in str(error.value)


def test_the_rebuild_command_fits_where_pyfastnn_is_imported_from(tmp_path):
    """Imported from a source folder, the extension beside the sources is the one loaded: a plain
    install would leave it stale, so the command rebuilds it in place."""
    installed = extension.rebuild_hint(tmp_path / "site-packages" / "pyfastnn")
    assert "`pip install --no-build-isolation .`" in installed and "in the pyfastnn source folder" in installed
    (tmp_path / "setup.py").write_text("")
    assert extension.rebuild_hint(tmp_path / "pyfastnn") == installed  # another project's setup.py
    (tmp_path / "csrc").mkdir()
    in_place = extension.rebuild_hint(tmp_path / "pyfastnn")
    assert f"in {tmp_path} run `pip install --no-build-isolation -e .`" in in_place


def test_setup_takes_the_packages_own_constants():
    from pyfastnn import extension, extras

    setup_module = load_setup_module()
    assert setup_module.VERSION == pyfastnn.__version__
    assert (setup_module.INSTALL_COMMAND, setup_module.EDITABLE_COMMAND) == (extension.INSTALL_COMMAND,
                                                                             extension.EDITABLE_COMMAND)
    assert setup_module.package_constant("extras", "LESSON_REQUIREMENTS") == extras.LESSON_REQUIREMENTS
    built = "/site/pyfastnn/_C.cpython-311-x86_64-linux-gnu.so"
    assert Path(setup_module.build_record_path(built)) == extension.record_path(built)
    with pytest.raises(LookupError, match="pyfastnn/extras.py defines no constant MISSING"):
        setup_module.package_constant("extras", "MISSING")


def test_the_package_requires_the_torch_release_it_is_built_against():
    requirement = load_setup_module().torch_requirement
    assert requirement("2.13.0+cpu") == requirement("2.13.0") == "torch==2.13.0"
    assert requirement("2.14.0.dev20260101+cu130") == "torch==2.14.0.dev20260101"
    assert requirement("2.13.0a0+git1234abc") == "torch==2.13.0a0+git1234abc"  # a source build: that commit


def test_same_release_with_another_local_tag_loads():
    extension.check_built_for({"torch": "2.13.0+cpu", "cuda": None}, "2.13.0+cu128", "12.8")


def import_with_record(folder: Path, rewrite) -> subprocess.CompletedProcess:
    """`import pyfastnn` from a copy of the installed package in ``folder`` whose build record's text
    is ``rewrite(text)``."""
    package = folder / "pyfastnn"
    shutil.copytree(Path(pyfastnn.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    [record_file] = package.glob("_C.*.json")
    record_file.write_text(rewrite(record_file.read_text()))
    return run_python("import pyfastnn", cwd=folder)


def test_importing_under_another_torch_names_both_versions(tmp_path):
    # A copy of the installed package whose record says it was built against another torch: the
    # import must stop before loading the library, with both versions and the rebuild command.
    result = import_with_record(tmp_path, lambda text: json.dumps({**json.loads(text), "torch": "2.99.0"}))
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: pyfastnn's extension was built against torch 2.99.0, but torch "
                                f"{torch.__version__} is installed"), result.stderr
    assert "pip install --no-build-isolation ." in last_line


def test_ops_another_library_registered_first_are_a_clear_import_error():
    # As when libpyfastnn_ops (the C++ library) was loaded before: registering the namespace again
    # would stop the process inside torch.
    code = "import torch; torch.library.define('pyfastnn::fused_linear', '(Tensor x) -> Tensor'); import pyfastnn"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ImportError: the pyfastnn ops are already registered in this process, by another library"), result.stderr


@pytest.mark.parametrize("content", ["[1]", "null", "{not json"])
def test_an_unreadable_build_record_is_a_clear_import_error(tmp_path, content):
    result = import_with_record(tmp_path, lambda text: content)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last_line.startswith("ImportError: pyfastnn's build record"), result.stderr
    assert "is unreadable" in last_line and "pip install --no-build-isolation ." in last_line


def test_setup_without_torch_fails_at_once_with_the_command():
    # What pip's isolated build runs into: no torch importable. It must stop before compiling anything.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})")
    result = run_python(code)
    assert result.returncode == 1
    assert "pip install --no-build-isolation ." in result.stderr and "sees no torch" in result.stderr


def make_toolkit(root: Path, *, headers: bool = True, runtime: bool = True) -> str:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    if runtime:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    return str(root)


def test_cuda_choice(tmp_path):
    setup_module = load_setup_module()
    want_cuda = functools.partial(setup_module.want_cuda, torch_version="2.13.0+cu130")
    full = make_toolkit(tmp_path / "full")
    nvcc_only = make_toolkit(tmp_path / "nvcc-only", headers=False, runtime=False)
    no_runtime = make_toolkit(tmp_path / "no-runtime", runtime=False)

    assert want_cuda("", "12.8", full, True) == (True, None)
    assert want_cuda("", None, None, True) == (False, None)  # a plain CPU setup: nothing to warn about
    assert want_cuda("0", "12.8", full, True) == (False, None)
    for typo in ("true", "off", "yes"):  # never read as unset: the user asked for something
        with pytest.raises(SystemExit, match=f"PYFASTNN_CUDA must be 0 .* got '{typo}'"):
            want_cuda(typo, "12.8", full, True)
    # Half a CUDA setup, PYFASTNN_CUDA unset: the CPU backend, with a warning saying why.
    with_cuda, warning = want_cuda("", "12.8", nvcc_only, True)
    assert not with_cuda and "cuda_runtime.h" in warning and "CPU backend" in warning
    with_cuda, warning = want_cuda("", "12.8", no_runtime, True)
    assert not with_cuda and "libcudart" in warning
    with_cuda, warning = want_cuda("", None, full, True)
    assert not with_cuda and "without CUDA" in warning
    with_cuda, warning = want_cuda("", "12.8", None, True)
    assert not with_cuda and "no CUDA toolkit" in warning
    with pytest.raises(SystemExit, match="PYFASTNN_CUDA=1 but the CUDA backend cannot be built: .*cuda_runtime.h"):
        want_cuda("1", "12.8", nvcc_only, True)
    # A CUDA torch older than the backend's torch API: CPU only, saying so; an error when CUDA is required.
    with_cuda, warning = setup_module.want_cuda("", "12.8", full, True, torch_version="2.9.1+cu128")
    assert not with_cuda and "needs torch >= 2.10, this is 2.9.1+cu128" in warning
    with pytest.raises(SystemExit, match="needs torch >= 2.10"):
        setup_module.want_cuda("1", "12.8", full, True, torch_version="2.9.1+cu128")
    assert setup_module.want_cuda("", "13.0", full, True, torch_version="2.11.0+cu130") == (True, None)


def test_cuda_headers_of_the_toolkit_come_before_those_of_the_torch_wheel(tmp_path):
    # A CUDA torch wheel's nvidia-* packages carry the cuBLAS/cuSPARSE/cuSOLVER headers a toolkit may
    # lack, and a whole CUDA runtime's headers of the wheel's release (torch 2.15: 13.2), which nvcc
    # refuses beside another release's compiler: they may only fill the toolkit's gaps.
    setup_module = load_setup_module()
    toolkit = Path(make_toolkit(tmp_path / "cuda"))
    site = tmp_path / "site-packages"
    for package, headers in (("cu13", ("cuda_runtime.h", "cublasLt.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")),
                             ("nccl", ("nccl.h",))):
        (site / "nvidia" / package / "include").mkdir(parents=True)
        for header in headers:
            (site / "nvidia" / package / "include" / header).write_text("")
    (site / "nvidia" / "empty").mkdir()
    dirs = setup_module.cuda_include_dirs(str(toolkit), [str(tmp_path / "elsewhere"), str(site)])
    assert dirs == [str(toolkit / "include"), str(site / "nvidia" / "cu13" / "include"),
                    str(site / "nvidia" / "nccl" / "include")]
    # A toolkit with every library header torch's CUDA headers include needs nothing else.
    for header in setup_module.CUDA_LIBRARY_HEADERS:
        (toolkit / "include" / header).write_text("")
    assert setup_module.cuda_include_dirs(str(toolkit), [str(site)]) == []


def test_setup_with_a_half_found_toolkit_builds_cpu_with_a_warning(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYFASTNN_CUDA"}
    env["CUDA_HOME"] = make_toolkit(tmp_path / "cuda", headers=False, runtime=False)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "building the CPU backend only" in result.stderr


def test_cpu_capabilities_per_machine():
    setup_module = load_setup_module()
    names = lambda machine, compiler: [c["name"] for c in setup_module.cpu_capabilities(machine, compiler)]  # noqa: E731
    assert names("x86_64", "unix") == ["DEFAULT", "AVX2", "AVX512"]
    assert names("aarch64", "unix") == ["DEFAULT"]
    assert names("AMD64", "msvc") == ["DEFAULT"]


def test_one_source_list_for_both_builds():
    config = json.loads((ROOT / "cmake" / "sources.json").read_text())
    assert "include(cmake/PyfastnnSources.cmake)" in (ROOT / "CMakeLists.txt").read_text()
    assert "sources.json" in (ROOT / "cmake" / "PyfastnnSources.cmake").read_text()
    for kernel in config["cpu_kernels"]:
        assert (ROOT / kernel).is_file(), kernel
    assert not list((ROOT / "csrc").rglob("isa_macros.h"))
    offenders = [str(p) for p in (ROOT / "csrc").rglob("*") if p.is_file() and "pragma GCC target" in p.read_text()]
    assert not offenders, offenders


def aten_parallel_backend() -> str:
    """"openmp" or "native": what torch's ATen/Config.h says its parallel_for runs on."""
    config = (Path(torch.__file__).parent / "include" / "ATen" / "Config.h").read_text()
    return "openmp" if re.search(r"^#define AT_PARALLEL_OPENMP 1", config, re.MULTILINE) else "native"


def test_the_build_runs_its_loops_on_torchs_threads():
    """Compiled without OpenMP, at::parallel_for is a serial loop and every kernel runs on the calling
    thread: with GCC on Linux against an OpenMP ATen the build must compile it as OpenMP."""
    from torch.utils import cpp_extension

    gcc = load_setup_module().is_gcc(cpp_extension.get_cxx_compiler())
    backend = aten_parallel_backend()
    if backend == "native":
        expected = "native"  # ATen's own pool, with or without OpenMP flags
    else:
        expected = "openmp" if gcc and sys.platform.startswith("linux") else "serial"
    assert pyfastnn.info()["cpu_parallel_loops"] == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loading_the_extension_maps_no_openmp_runtime_beyond_torchs():
    """The extension's loops must run on torch's OpenMP runtime, never on a second one of its own."""
    result = run_python(
        "import os, re\n"
        "def runtimes():\n"
        "    paths = {line.split()[-1] for line in open('/proc/self/maps') if '/' in line}\n"
        "    return {os.path.realpath(p) for p in paths if re.match(r'lib(g|i)?omp[^/]*\\.so', os.path.basename(p))}\n"
        "import torch\n"
        "before = runtimes()\n"
        "import pyfastnn\n"
        "print(len(before), sorted(runtimes() - before))")
    assert result.returncode == 0, result.stderr
    count, added = result.stdout.split(" ", 1)
    assert added.strip() == "[]", result.stdout
    if pyfastnn.info()["cpu_parallel_loops"] == "openmp":
        assert int(count) >= 1, result.stdout  # torch's own libgomp, which the extension shares


def elf_section_names(path: Path) -> set:
    """The section names of an ELF64 little-endian file (the extension on x86-64 and aarch64 Linux)."""
    import struct
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip(f"{path.name} is not a 64-bit little-endian ELF file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    def section(index):  # (name offset, file offset)
        header = section_offset + index * entry_size
        return struct.unpack_from("<I", data, header)[0], struct.unpack_from("<Q", data, header + 0x18)[0]
    names_at = section(names_index)[1]
    return {data[names_at + name:data.index(b"\0", names_at + name)].decode()
            for name, _ in (section(i) for i in range(count))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the extension's ELF sections")
def test_the_extension_carries_debug_information_only_when_asked():
    # Python's CFLAGS ask for -g: ~30 MB of DWARF per wheel unless the build drops it (PYFASTNN_DEBUG_INFO=1 keeps it).
    record = extension.build_record()
    assert record is not None and "debug_info" in record, record
    sections = elf_section_names(Path(importlib.util.find_spec("pyfastnn._C").origin))
    assert ".text" in sections and (".debug_info" in sections) == record["debug_info"], sorted(sections)


def test_openmp_flags_link_the_runtime_torch_ships(tmp_path):
    openmp_flags = load_setup_module().openmp_flags
    on_openmp = "#define AT_PARALLEL_OPENMP 1\n#define AT_PARALLEL_NATIVE 0\n"  # as in ATen/Config.h
    on_native = "#define AT_PARALLEL_OPENMP 0\n#define AT_PARALLEL_NATIVE 1\n"
    assert openmp_flags(True, "linux", on_openmp, tmp_path) == (["-fopenmp"], ["-fopenmp"])  # the compiler's libgomp
    shipped = tmp_path / "libgomp-a34b3233.so.1"  # some wheels ship it under a hashed name
    shipped.write_bytes(b"")
    assert openmp_flags(True, "linux", on_openmp, tmp_path) == (["-fopenmp"], [str(shipped)])
    # A second runtime (clang's libomp), another backend or platform: serial loops.
    assert openmp_flags(False, "linux", on_openmp, tmp_path) == ([], [])
    assert openmp_flags(True, "linux", on_native, tmp_path) == ([], [])
    assert openmp_flags(True, "darwin", on_openmp, tmp_path) == ([], [])


def test_the_sdist_carries_what_the_cmake_build_and_the_license_need():
    # MANIFEST.in decides what an sdist ships; CMakeLists.txt names its sources (the C++ tests too,
    # built by default) relative to the project folder.
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    grafted = [line.split()[1] + "/" for line in manifest if line.startswith("graft ")]
    included = {name for line in manifest if line.startswith("include ") for name in line.split()[1:]}
    named = set(re.findall(r"\b((?:tests|cmake|csrc)/[\w/.-]+\.(?:cpp|cmake|json|h))", (ROOT / "CMakeLists.txt").read_text()))
    assert {"tests/cpp/test_fused_linear.cpp", "tests/cpp/test_registration.cpp"} <= named
    assert [name for name in sorted(named) if not any(name.startswith(folder) for folder in grafted)] == []
    assert {"CMakeLists.txt", "README.md", "LICENSE"} <= included and (ROOT / "LICENSE").is_file()
