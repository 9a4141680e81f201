"""The docstring examples of a module's public API as a reader runs them: pasted into a fresh
interpreter, with only the imports they show (``--doctest-modules`` runs each in its module's
namespace, where names it never imports are found anyway)."""

import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Iterator, List, Tuple


def _public_objects(module: ModuleType) -> Iterator[Tuple[str, object]]:
    """The functions and classes in ``module.__all__``, and the public methods of those classes."""
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # constants: their docstring is their type's
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attribute, value in vars(obj).items():
                function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if not attribute.startswith("_") and (inspect.isfunction(function) or isinstance(value, property)):
                    yield f"{module.__name__}.{name}.{attribute}", function


def failing_examples(module: ModuleType) -> List[str]:
    """The public names of ``module`` whose examples fail in a fresh namespace, each with its report."""
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for name, obj in _public_objects(module):
        for test in finder.find(obj, name, globs={}):
            report: List[str] = []
            if test.examples and runner.run(test, out=report.append, clear_globs=True).failed:
                failures.append(f"{name}:\n{''.join(report)}")
    return failures


def public_modules(package: ModuleType, exclude: Tuple[str, ...] = ()) -> List[ModuleType]:
    """``package`` and its public modules that declare an API (``__all__``), subpackages' included,
    but those under the ``exclude`` packages (never imported)."""
    names = [package.__name__] + [info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
                                  if not any(part.startswith("_") for part in info.name.split("."))]
    names = [name for name in names if not any(name == ex or name.startswith(ex + ".") for ex in exclude)]
    modules = [importlib.import_module(name) for name in names]
    return [module for module in modules if hasattr(module, "__all__")]
