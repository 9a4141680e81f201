"""Loads pyfastnn's compiled extension (``pyfastnn._C``), first checking that it was built against
the torch imported now.

A C++ extension only works with the torch release it was compiled against; loaded under another it
usually fails with an undefined-symbol error that names neither version. The build writes the torch
version beside the extension (``_C.<platform tag>.json``), and this module compares it before loading.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional

import torch

EXTENSION = __name__.rpartition(".")[0] + "._C"
INSTALL_COMMAND = "pip install --no-build-isolation ."
EDITABLE_COMMAND = "pip install --no-build-isolation -e ."
PACKAGE = Path(__file__).resolve().parent


def in_source_folder(package: Path = PACKAGE) -> bool:
    """Whether ``package`` is the pyfastnn folder of a source tree (imported from there: Python runs
    in it, or an editable install), whose extension beside the sources is the one loaded."""
    return (package.parent / "setup.py").is_file() and (package.parent / "csrc").is_dir()


def rebuild_hint(package: Path = PACKAGE) -> str:
    """The command that rebuilds the extension imported from ``package``: in place in a source
    folder; otherwise a reinstall from the source folder.

    Example:
        >>> rebuild_hint(Path("/site-packages/pyfastnn"))
        'rebuild pyfastnn against the torch installed now: in the pyfastnn source folder run `pip install --no-build-isolation .` (or install the torch it was built with)'
    """
    if in_source_folder(package):
        return (f"rebuild it in place against the torch installed now: in {package.parent} run "
                f"`{EDITABLE_COMMAND}` (or install the torch it was built with)")
    return (f"rebuild pyfastnn against the torch installed now: in the pyfastnn source folder run "
            f"`{INSTALL_COMMAND}` (or install the torch it was built with)")


#: The build record's suffix: it lies beside the extension file under the same name (setup.py reads this).
RECORD_SUFFIX = ".json"


def record_path(extension_file: str) -> Path:
    """The build record beside an extension file (``_C.cpython-311-x86_64-linux-gnu.so`` ->
    ``_C.cpython-311-x86_64-linux-gnu.json``), as setup.py writes it.

    Example:
        >>> record_path("/site/pyfastnn/_C.cpython-311-x86_64-linux-gnu.so").name
        '_C.cpython-311-x86_64-linux-gnu.json'
    """
    return Path(extension_file).with_suffix(RECORD_SUFFIX)


def release(version: str) -> str:
    """A torch version without its local build tag: ``2.13.0+cpu`` -> ``2.13.0``.

    Example:
        >>> release("2.13.0+cu128")
        '2.13.0'
    """
    return version.split("+", 1)[0]


def check_built_for(record: Dict[str, Any], torch_version: str, torch_cuda: Optional[str]) -> None:
    """Raises ImportError when an extension built as ``record`` says cannot run under this torch.

    The C++ ABI of torch changes between releases, so the release must match exactly; the local tag
    (``+cpu``, ``+cu128``) may differ, but a CUDA build needs a torch with CUDA.

    Example:
        >>> check_built_for({"torch": "2.13.0+cpu", "cuda": None}, "2.13.0+cpu", None)
        >>> check_built_for({"torch": "2.12.1", "cuda": None}, "2.13.0+cpu", None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ImportError: pyfastnn's extension was built against torch 2.12.1, but torch 2.13.0+cpu is installed: ...
    """
    built = str(record.get("torch", "unknown"))
    if release(built) != release(torch_version):
        raise ImportError(f"pyfastnn's extension was built against torch {built}, but torch {torch_version} "
                          f"is installed: {rebuild_hint()}")
    if record.get("cuda") and not torch_cuda:
        raise ImportError(f"pyfastnn's extension was built with CUDA {record['cuda']} against torch {built}, "
                          f"but the installed torch {torch_version} has no CUDA: {rebuild_hint()}")


def build_record() -> Optional[Dict[str, Any]]:
    """What the build recorded (torch version, CUDA version, CPU capabilities), or None if unknown."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or not spec.origin:
        return None
    path = record_path(spec.origin)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ImportError(f"pyfastnn's build record {path} is unreadable ({error}): {rebuild_hint()}") from None
    if not isinstance(record, dict):
        raise ImportError(f"pyfastnn's build record {path} is unreadable (not a JSON object): {rebuild_hint()}")
    return record


def _ops_already_registered() -> bool:
    try:
        torch.ops.pyfastnn.fused_linear
    except (AttributeError, RuntimeError):
        return False
    return True


def load_extension() -> ModuleType:
    """Imports ``pyfastnn._C`` (which registers ``torch.ops.pyfastnn.*``), or raises an ImportError that
    names the problem and the command that fixes it."""
    if importlib.util.find_spec(EXTENSION) is None:
        if in_source_folder():
            raise ImportError(f"pyfastnn's compiled extension {EXTENSION} is missing from {PACKAGE}, a source folder "
                              f"(Python imports pyfastnn from there when it runs in that folder or after an editable "
                              f"install, never an installed copy): build it in place with `{EDITABLE_COMMAND}` in "
                              f"{PACKAGE.parent}")
        raise ImportError(f"pyfastnn's compiled extension {EXTENSION} is missing from {PACKAGE}: reinstall it with "
                          f"`{INSTALL_COMMAND}` in the pyfastnn source folder")
    record = build_record()
    if record is not None:
        check_built_for(record, torch.__version__, torch.version.cuda)
    if EXTENSION not in sys.modules and _ops_already_registered():
        # A second registration of the namespace would abort the process inside torch.
        raise ImportError("the pyfastnn ops are already registered in this process, by another library (the C++ "
                          "library libpyfastnn_ops, loaded with torch.ops.load_library?): one process holds one of "
                          "them; call torch.ops.pyfastnn.* from that one, or import pyfastnn without loading it")
    try:
        return importlib.import_module(EXTENSION)
    except ImportError as error:
        built = f"torch {record['torch']}" if record else "an unrecorded torch"
        raise ImportError(f"pyfastnn's extension failed to load ({error}); it was built against {built} and "
                          f"torch {torch.__version__} is installed: {rebuild_hint()}") from error
