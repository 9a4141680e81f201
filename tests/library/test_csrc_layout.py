"""The C++ sources' layout, enforced on their ``#include "..."`` lines:

* no include cycles among the files under csrc/;
* neither device includes the other's files (csrc/cpu/ nothing of csrc/cuda/, and the reverse);
* layer.cpp, the device-neutral layer flow, reaches the devices only through their entry headers
  (``cpu/gemm.h`` and ``cuda/gemm.h``, the matrix products of each device); the epilogue launchers it
  calls are declared in the device-neutral ``epilogue.h``. Anything else under csrc/cpu/ or
  csrc/cuda/ (cuBLASLt, kernel tables, vector math) is a device's internals;
* ``cpu/capability.h``, the per-capability preamble, is included only by the per-capability kernel
  sources (cmake/sources.json's cpu_kernels), which include it first.

An include is resolved as the compiler does here: relative to the including file, then to csrc/.
Each check also runs on a small tree with a deliberate violation, so that a checker that finds
nothing cannot pass unnoticed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)

DEVICE_NEUTRAL_LAYER = "layer.cpp"
DEVICE_ENTRY_HEADERS = {"cpu/gemm.h", "cuda/gemm.h"}
CAPABILITY_PREAMBLE = "cpu/capability.h"


def include_graph(csrc: Path) -> Dict[str, List[str]]:
    """Every source under csrc (path relative to it, with /) -> the csrc files it includes, in order."""
    graph: Dict[str, List[str]] = {}
    for path in sorted(csrc.rglob("*")):
        if path.suffix not in SOURCE_SUFFIXES or not path.is_file():
            continue
        includes = []
        for name in INCLUDE.findall(path.read_text()):
            for base in (path.parent, csrc):
                target = (base / name).resolve()
                if target.is_file() and csrc.resolve() in target.parents:
                    includes.append(target.relative_to(csrc.resolve()).as_posix())
                    break
        graph[path.relative_to(csrc).as_posix()] = includes
    return graph


def find_cycle(graph: Dict[str, List[str]]) -> Optional[List[str]]:
    """One include cycle (its files, the first repeated at the end), or None."""
    done: set = set()
    for start in graph:
        if start in done:
            continue
        path: List[str] = []
        on_path: set = set()
        stack = [(start, iter(graph.get(start, [])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return path[path.index(child):] + [child]
            elif child not in done:
                stack.append((child, iter(graph.get(child, []))))
                path.append(child)
                on_path.add(child)
    return None


def cross_device_includes(graph: Dict[str, List[str]]) -> List[str]:
    """``a -> b`` for each file of one device (csrc/cpu/, csrc/cuda/) that includes one of the other's."""
    device = {"cpu": "cuda", "cuda": "cpu"}
    return [f"{f} -> {included}" for f, includes in graph.items() for included in includes
            if f.split("/")[0] in device and included.split("/")[0] == device[f.split("/")[0]]]


def device_internals_in_layer(graph: Dict[str, List[str]]) -> List[str]:
    """The csrc/cpu/ and csrc/cuda/ files layer.cpp includes besides the device entry headers."""
    return [f for f in graph.get(DEVICE_NEUTRAL_LAYER, [])
            if f.split("/")[0] in ("cpu", "cuda") and f not in DEVICE_ENTRY_HEADERS]


def capability_preamble_misuse(graph: Dict[str, List[str]], kernel_sources: Sequence[str]) -> List[str]:
    """Files including the capability preamble that are not kernel sources, and kernel sources that
    do not include it first."""
    problems = [f"{f} includes {CAPABILITY_PREAMBLE}" for f, includes in graph.items()
                if CAPABILITY_PREAMBLE in includes and f not in kernel_sources]
    problems += [f"{f} does not include {CAPABILITY_PREAMBLE} first" for f in kernel_sources
                 if graph.get(f, [None])[:1] != [CAPABILITY_PREAMBLE]]
    return problems


def kernel_sources() -> List[str]:
    config = json.loads((ROOT / "cmake" / "sources.json").read_text())
    return [Path(s).relative_to("csrc").as_posix() for s in config["cpu_kernels"]]


def write_tree(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# The checks on the real sources.

def test_sources_are_found():
    graph = include_graph(CSRC)
    assert DEVICE_NEUTRAL_LAYER in graph and "cpu/gemm.h" in graph and "cuda/gemm.h" in graph
    assert "cpu/gemm.h" in graph[DEVICE_NEUTRAL_LAYER]


def test_no_include_cycles():
    assert find_cycle(include_graph(CSRC)) is None


def test_neither_device_includes_the_others_files():
    assert cross_device_includes(include_graph(CSRC)) == []


def test_layer_reaches_devices_only_through_entry_headers():
    assert device_internals_in_layer(include_graph(CSRC)) == []


def test_capability_preamble_only_in_kernel_sources():
    assert capability_preamble_misuse(include_graph(CSRC), kernel_sources()) == []


# The same checks on trees with a deliberate violation.

def test_cycle_is_found(tmp_path):
    tree = write_tree(tmp_path, {
        "a.h": '#include "b.h"\n',
        "cpu/b.h": "",
        "b.h": '#include "cpu/c.h"\n',
        "cpu/c.h": '#include "../a.h"\n',  # relative to the including file
        "d.cpp": '#include "a.h"\n',
    })
    assert find_cycle(include_graph(tree)) == ["a.h", "b.h", "cpu/c.h", "a.h"]
    (tree / "cpu" / "c.h").write_text("")
    assert find_cycle(include_graph(tree)) is None


def test_self_include_is_a_cycle(tmp_path):
    tree = write_tree(tmp_path, {"a.h": '#include "a.h"\n'})
    assert find_cycle(include_graph(tree)) == ["a.h", "a.h"]


def test_cross_device_includes_are_found(tmp_path):
    tree = write_tree(tmp_path, {
        "cpu/gemm.cpp": '#include "../cuda/blaslt.h"\n#include "../epilogue.h"\n',
        "cuda/epilogue.cu": '#include "cpu/vec_math.h"\n',  # relative to csrc/
        "cuda/blaslt.h": "", "cpu/vec_math.h": "", "epilogue.h": "",
    })
    assert cross_device_includes(include_graph(tree)) == ["cpu/gemm.cpp -> cuda/blaslt.h",
                                                          "cuda/epilogue.cu -> cpu/vec_math.h"]


def test_device_internals_in_layer_are_found(tmp_path):
    tree = write_tree(tmp_path, {
        "layer.cpp": '#include "cpu/gemm.h"\n#include "cuda/gemm.h"\n#include "cuda/blaslt.h"\n',
        "cpu/gemm.h": "", "cuda/gemm.h": "", "cuda/blaslt.h": "",
    })
    assert device_internals_in_layer(include_graph(tree)) == ["cuda/blaslt.h"]


def test_capability_preamble_misuse_is_found(tmp_path):
    tree = write_tree(tmp_path, {
        "cpu/capability.h": "",
        "cpu/kernels.h": '#include "capability.h"\n',
        "cpu/k1.cpp": '#include "capability.h"\n#include "kernels.h"\n',
        "cpu/k2.cpp": '#include "kernels.h"\n#include "capability.h"\n',
    })
    assert capability_preamble_misuse(include_graph(tree), ["cpu/k1.cpp", "cpu/k2.cpp"]) == [
        "cpu/kernels.h includes cpu/capability.h",
        "cpu/k2.cpp does not include cpu/capability.h first",
    ]
