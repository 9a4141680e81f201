"""The package's architecture, enforced: no import circles among pyfastnn's modules, no private name
used outside its module (a private module, function or attribute of a pyfastnn object, in the
package and in the scripts, benchmarks and tests that use it), the library never imports the lesson
(only the command line loads it, on demand), ``import pyfastnn`` leaves the lesson, tqdm and
matplotlib unimported, and the tests collect without the lesson's extra.

The checks read the sources with ``ast``; each is also run on a small tree with a deliberate
violation, so that a checker that finds nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set

import pytest

from pyfastnn.extras import LESSON_REQUIREMENTS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pyfastnn"
LESSON = f"{PACKAGE}.lesson"
# The command line is the one library module that loads the lesson, inside its train/demo branch.
LESSON_LOADERS = {f"{PACKAGE}.cli"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str       # module (or script) doing the import
    target: str         # the pyfastnn module imported
    line: int
    lazy: bool          # inside a function (runs when called, not when the importer is imported)


class SourceTree:
    """The pyfastnn modules found under ``root`` (a package folder's parent), by module name."""

    def __init__(self, root: Path, package: str = PACKAGE) -> None:
        self.root = root
        self.modules: Dict[str, Path] = {}
        for path in sorted((root / package).rglob("*")):
            if path.suffix == ".py" or (path.suffix == ".so" and path.name.startswith("_C.")):
                parts = list(path.relative_to(root).with_suffix("").parts)
                if path.suffix == ".so":
                    parts[-1] = path.name.split(".")[0]
                if parts[-1] == "__init__":
                    parts.pop()
                self.modules[".".join(parts)] = path

    def is_module(self, name: str) -> bool:
        return name in self.modules

    def is_package(self, name: str) -> bool:
        return name in self.modules and self.modules[name].name == "__init__.py"

    def sources(self) -> Iterator[tuple]:
        for name, path in self.modules.items():
            if path.suffix == ".py":
                yield name, path

    def private_attributes(self) -> Dict[str, Set[str]]:
        """Private attribute name -> the modules whose classes define it (methods, class attributes,
        ``self._x = ...`` in a method): what other modules may not reach into on their objects."""
        if not hasattr(self, "_private_attributes"):
            found: Dict[str, Set[str]] = {}
            for name, path in self.sources():
                for node in ast.walk(ast.parse(path.read_text(), str(path))):
                    if not isinstance(node, ast.ClassDef):
                        continue
                    attributes = []
                    for member in node.body:  # methods and class attributes
                        if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                            attributes.append(member.name)
                        elif isinstance(member, (ast.Assign, ast.AnnAssign)):
                            targets = member.targets if isinstance(member, ast.Assign) else [member.target]
                            attributes += [t.id for t in targets if isinstance(t, ast.Name)]
                    attributes += [member.attr for member in ast.walk(node)  # self._x = ... in a method
                                   if isinstance(member, ast.Attribute) and isinstance(member.ctx, ast.Store)
                                   and isinstance(member.value, ast.Name) and member.value.id == "self"]
                    for attribute in attributes:
                        if is_private(attribute) and attribute.strip("_"):
                            found.setdefault(attribute, set()).add(name)
            self._private_attributes = found
        return self._private_attributes


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module a ``from ... import`` names, or None for a module outside pyfastnn."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = importer.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return base if base == PACKAGE or base.startswith(PACKAGE + ".") else None


def _lazy_nodes(tree: ast.AST) -> Set[int]:
    """ids of the import nodes inside function bodies."""
    lazy = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lazy.add(id(node))
    return lazy


@dataclasses.dataclass
class Findings:
    imports: List[Import]
    private_uses: List[str]


def scan(tree: SourceTree, name: str, path: Path, in_package: bool = True) -> Findings:
    """The pyfastnn imports of one source file, and its uses of private names of other modules."""
    source = ast.parse(path.read_text(), str(path))
    lazy = _lazy_nodes(source)
    is_package = path.name == "__init__.py"
    imports: List[Import] = []
    private: List[str] = []
    module_aliases: Dict[str, str] = {}  # local name -> pyfastnn module it is bound to
    where = f"{path.relative_to(tree.root)}"

    def private_module_allowed(module: str) -> bool:
        # A private module (_ops, _patterns, _version, _C) is the package's own business: siblings may import it.
        return in_package

    for node in ast.walk(source):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    imports.append(Import(name, alias.name, node.lineno, id(node) in lazy))
                    module_aliases[alias.asname or alias.name.split(".")[0]] = \
                        alias.name if alias.asname else PACKAGE
                    hidden = [p for p in alias.name.split(".")[1:] if is_private(p)]
                    if hidden and not private_module_allowed(alias.name):
                        private.append(f"{where}:{node.lineno}: imports private module {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            if base is None:
                continue
            if any(is_private(p) for p in base.split(".")[1:]) and not private_module_allowed(base):
                private.append(f"{where}:{node.lineno}: imports from private module {base}")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if tree.is_module(submodule):
                    imports.append(Import(name, submodule, node.lineno, id(node) in lazy))
                    module_aliases[alias.asname or alias.name] = submodule
                    if is_private(alias.name) and not private_module_allowed(submodule):
                        private.append(f"{where}:{node.lineno}: imports private module {submodule}")
                else:
                    imports.append(Import(name, base, node.lineno, id(node) in lazy))
                    if is_private(alias.name):
                        private.append(f"{where}:{node.lineno}: imports private name {alias.name} from {base}")
    private_attributes = tree.private_attributes()
    for node in ast.walk(source):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = _attribute_owner(node.value, module_aliases)
            if owner is not None and owner != name:
                target = f"{owner}.{node.attr}"
                if not (tree.is_module(target) and private_module_allowed(target)):
                    private.append(f"{where}:{node.lineno}: uses private name {node.attr} of {owner}")
            elif owner is None and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                # An object's private attribute, e.g. ``step._training``: the modules whose classes
                # define that name may use it; anyone else reaches into another module's objects.
                owners = private_attributes.get(node.attr, set())
                if owners and name not in owners:
                    private.append(f"{where}:{node.lineno}: uses private attribute {node.attr} of an object "
                                   f"of {', '.join(sorted(owners))}")
    return Findings(imports, private)


def _attribute_owner(value: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
    """The pyfastnn module an expression like ``pyfastnn.nn`` or ``nn_module`` denotes, if any."""
    if isinstance(value, ast.Name):
        return aliases.get(value.id)
    if isinstance(value, ast.Attribute):
        owner = _attribute_owner(value.value, aliases)
        return f"{owner}.{value.attr}" if owner is not None else None
    return None


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle (a list of modules, the first repeated last), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(module: str) -> Optional[List[str]]:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


@dataclasses.dataclass
class Report:
    cycle: Optional[List[str]]
    private_uses: List[str]
    upward_imports: List[str]


def check_tree(root: Path, scripts: Sequence[Path] = ()) -> Report:
    """Every rule over the package under ``root`` (plus scripts that use it, for the private-name rule)."""
    tree = SourceTree(root)
    edges: Dict[str, Set[str]] = {}
    private: List[str] = []
    upward: List[str] = []
    for name, path in tree.sources():
        # The lesson is a wing that uses the library's public API: the private modules are not its own.
        findings = scan(tree, name, path, in_package=not (name == LESSON or name.startswith(LESSON + ".")))
        private += findings.private_uses
        for found in findings.imports:
            # Lazy imports count too: a function-level import must not be how a circle is dodged.
            if found.target != name:
                edges.setdefault(name, set()).add(found.target)
            library = not (name == LESSON or name.startswith(LESSON + "."))
            lesson_target = found.target == LESSON or found.target.startswith(LESSON + ".")
            if library and lesson_target and not (name in LESSON_LOADERS and found.lazy):
                upward.append(f"{path.relative_to(root)}:{found.line}: library module {name} imports {found.target}")
    for script in scripts:
        private += scan(tree, f"<script {script.name}>", script, in_package=False).private_uses
    return Report(find_cycle(edges), private, upward)


def _scripts() -> List[Path]:
    """Every Python file outside the package that uses it: scripts, benchmarks, tests, conftest files."""
    return sorted([*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                   *(ROOT / "tests").rglob("*.py")])


def test_the_package_has_no_import_circles():
    report = check_tree(ROOT)
    assert report.cycle is None, " -> ".join(report.cycle)


def test_no_private_name_is_used_outside_its_module():
    assert check_tree(ROOT, _scripts()).private_uses == []


def test_the_library_never_imports_the_lesson():
    assert check_tree(ROOT).upward_imports == []


def test_the_checks_see_the_whole_package():
    tree = SourceTree(ROOT)
    for module in ("pyfastnn", "pyfastnn._ops", "pyfastnn._patterns", "pyfastnn.nn", "pyfastnn.fuse",
                   "pyfastnn.testing", "pyfastnn.lesson", "pyfastnn.lesson.train", "pyfastnn.cli"):
        assert tree.is_module(module), module
    imports = {(i.importer, i.target) for name, path in tree.sources() for i in scan(tree, name, path).imports}
    assert ("pyfastnn.fuse", "pyfastnn.nn") in imports and ("pyfastnn.nn", "pyfastnn._patterns") in imports
    assert ("pyfastnn.cli", "pyfastnn.lesson.train") in imports  # the on-demand loader, allowed when lazy


# --- The checks catch what they are for: a small package with one violation each ---

def _write_package(root: Path, files: Dict[str, str]) -> Path:
    for relative, text in {"pyfastnn/__init__.py": "", "pyfastnn/lesson/__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_circle_is_found_even_through_a_lazy_import(tmp_path):
    root = _write_package(tmp_path, {
        "pyfastnn/nn.py": "from .functional import fused\n",
        "pyfastnn/functional.py": "def fused():\n    from .nn import layer  # dodging the circle\n",
    })
    assert check_tree(root).cycle in (["pyfastnn.functional", "pyfastnn.nn", "pyfastnn.functional"],
                                      ["pyfastnn.nn", "pyfastnn.functional", "pyfastnn.nn"])


@pytest.mark.parametrize("source, problem", [
    ("from .functional import _helper\n", "imports private name _helper from pyfastnn.functional"),
    ("from pyfastnn.functional import _helper\n", "imports private name _helper from pyfastnn.functional"),
    ("from . import functional\nfunctional._helper()\n", "uses private name _helper of pyfastnn.functional"),
    ("import pyfastnn.functional\npyfastnn.functional._helper()\n", "uses private name _helper of pyfastnn.functional"),
])
def test_a_private_name_used_across_modules_is_found(tmp_path, source, problem):
    root = _write_package(tmp_path, {"pyfastnn/functional.py": "def _helper():\n    pass\n",
                                     "pyfastnn/nn.py": source})
    found = check_tree(root).private_uses
    assert len(found) == 1 and problem in found[0], found


def test_a_private_attribute_of_another_modules_object_is_found(tmp_path):
    root = _write_package(tmp_path, {
        "pyfastnn/graph.py": """
            class Step:
                _limit = 3
                def __init__(self):
                    self._training = True
                def _replay(self):
                    return self._training and self._limit  # its own module: fine
            """,
        "pyfastnn/nn.py": "from .graph import Step\nstep = Step()\n",
    })
    script = tmp_path / "test_step.py"
    script.write_text("import pyfastnn.nn\nstep = pyfastnn.nn.step\nstep._training = False\nstep._replay()\n"
                      "print(step._limit, step.__dict__, step._unknown)\n")
    found = check_tree(root, [script]).private_uses
    # _unknown is no pyfastnn class's name (e.g. torch's own internals): not this rule's business.
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        f"uses private attribute {name} of an object of pyfastnn.graph"
        for name in ("_training", "_replay", "_limit")), found


def test_private_modules_are_for_the_package_alone(tmp_path):
    root = _write_package(tmp_path, {"pyfastnn/_ops.py": "native = None\n",
                                     "pyfastnn/nn.py": "from ._ops import native\n"})
    script = tmp_path / "bench.py"
    script.write_text("from pyfastnn._ops import native\n")
    found = check_tree(root, [script]).private_uses
    assert len(found) == 1 and "bench.py:1: imports from private module pyfastnn._ops" in found[0], found


def test_the_lesson_uses_no_private_module(tmp_path):
    root = _write_package(tmp_path, {"pyfastnn/_ops.py": "native = None\n",
                                     "pyfastnn/lesson/models.py": "from .._ops import native\n"})
    found = check_tree(root).private_uses
    assert len(found) == 1 and "lesson/models.py:1: imports from private module pyfastnn._ops" in found[0], found


def test_a_library_import_of_the_lesson_is_found(tmp_path):
    root = _write_package(tmp_path, {
        "pyfastnn/lesson/models.py": "from ..nn import Layer\n",
        "pyfastnn/nn.py": "Layer = object\n",
        "pyfastnn/benchmark.py": "def bench():\n    from .lesson.models import Layer\n",
        "pyfastnn/cli.py": "from .lesson import models\n",  # at import time: not on demand
    })
    found = check_tree(root).upward_imports
    assert len(found) == 2, found
    assert any("pyfastnn.benchmark imports pyfastnn.lesson.models" in f for f in found)
    assert any("pyfastnn.cli imports pyfastnn.lesson.models" in f for f in found)


# --- What importing the library loads ---

def test_import_pyfastnn_leaves_the_lesson_and_its_dependencies_unimported():
    # torch itself imports tqdm where it is installed (torch.hub), so what counts is what pyfastnn adds.
    code = textwrap.dedent("""
        import sys, torch
        before = set(sys.modules)
        import pyfastnn, pyfastnn.benchmark, pyfastnn.testing, pyfastnn.cli
        added = set(sys.modules) - before
        print(sorted(m for m in added if m.split('.')[0] in ('tqdm', 'matplotlib', 'numpy')),
              sorted(m for m in sys.modules if m.startswith('pyfastnn.lesson')), 'pyfastnn.nn' in added)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] [] True"


def test_the_library_runs_without_the_lesson_dependencies():
    # numpy, tqdm and matplotlib made unimportable: the library (and its info and bench commands) works.
    code = textwrap.dedent("""
        import sys
        for name in ("numpy", "tqdm", "matplotlib"):
            sys.modules[name] = None
        import torch, pyfastnn
        x = torch.randn(3, 4)
        mlp = pyfastnn.fuse(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)))
        print(type(mlp).__name__, tuple(mlp(x).shape), pyfastnn.info()["pyfastnn"] == pyfastnn.__version__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FusedMLP (3, 2) True"


def test_the_tests_collect_without_the_lesson_dependencies():
    # pytest in an interpreter where the lesson extra's packages cannot be imported: the lesson's
    # modules and tests are left out of collection (conftest.py), the library's tests and docstring
    # examples are collected without an error.
    code = textwrap.dedent(f"""
        import sys
        for name in {LESSON_REQUIREMENTS!r}:
            sys.modules[name] = None
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/library", "tests/lesson",
                              "pyfastnn"]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = result.stdout.splitlines()
    assert any(line.startswith("tests/library/test_layout.py::") for line in collected), result.stdout[-3000:]
    assert any(line.startswith("pyfastnn/nn.py::") for line in collected), result.stdout[-3000:]
    assert not [line for line in collected if line.startswith(("tests/lesson/", "pyfastnn/lesson/"))]


def test_the_public_examples_run_as_pasted_into_a_fresh_interpreter():
    import pyfastnn
    from doc_examples import failing_examples, public_modules

    library = public_modules(pyfastnn, exclude=("pyfastnn.lesson",))  # the lesson's extra may be missing
    assert {"pyfastnn", "pyfastnn.files", "pyfastnn.benchmark"} <= {m.__name__ for m in library}
    failures = [failure for module in library for failure in failing_examples(module)]
    assert not failures, "\n".join(failures)
