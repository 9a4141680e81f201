"""pyfastnn.lesson as a package: what it exports, the extra it needs, and the one line the commands
print when that extra is missing."""

import importlib
import importlib.metadata
import re
import subprocess
import sys
import textwrap

import pytest

import pyfastnn.lesson
from doc_examples import failing_examples, public_modules
from pyfastnn.lesson import MNISTClassifier, NumpyTwoLayerNet, Perceptron, SimpleNN, TrainConfig, TwoLayerNet


def test_the_lesson_exports_its_classes_and_functions():
    assert MNISTClassifier.__module__ == "pyfastnn.lesson.models"
    for cls in (MNISTClassifier, SimpleNN, Perceptron, NumpyTwoLayerNet, TwoLayerNet, TrainConfig):
        assert cls.__name__ in pyfastnn.lesson.__all__
    for name in pyfastnn.lesson.__all__:
        assert hasattr(pyfastnn.lesson, name), name
    # no exported name hides a module
    for module in ("models", "data", "settings", "train", "checkpoint", "processes", "demo", "plots"):
        assert importlib.import_module(f"pyfastnn.lesson.{module}") is getattr(pyfastnn.lesson, module)


def test_the_lessons_examples_run_as_pasted_into_a_fresh_interpreter():
    modules = public_modules(pyfastnn.lesson)
    assert {"pyfastnn.lesson", "pyfastnn.lesson.models", "pyfastnn.lesson.data"} <= {m.__name__ for m in modules}
    failures = [failure for module in modules for failure in failing_examples(module)]
    assert not failures, "\n".join(failures)


def test_the_lesson_extra_lists_what_the_lesson_checks_for():
    requirements = importlib.metadata.requires("pyfastnn") or []
    lesson = sorted(re.split(r"[;<>=~ \[]", r, maxsplit=1)[0] for r in requirements if 'extra == "lesson"' in r)
    library = sorted(r for r in requirements if "extra ==" not in r)
    assert lesson == sorted(pyfastnn.lesson.REQUIREMENTS)
    assert [re.split(r"[;<>=~ ]", r, maxsplit=1)[0] for r in library] == ["torch"]


def _without(blocked: str, code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter in which ``blocked`` cannot be imported."""
    # torch warns once that it runs without numpy: its own message, not the lesson's.
    prelude = (f"import sys, warnings\nsys.modules[{blocked!r}] = None\n"
               f"warnings.filterwarnings('ignore', message='Failed to initialize NumPy')\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("blocked", pyfastnn.lesson.REQUIREMENTS)
def test_import_without_an_extra_dependency_names_it_and_the_install_command(blocked):
    result = _without(blocked, """
        try:
            import pyfastnn.lesson
        except ModuleNotFoundError as error:
            print(error.name, "|", error)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{blocked} | the pyfastnn lesson needs {blocked}, which is not installed: "
                                     f'pip install "pyfastnn[lesson]"')


@pytest.mark.parametrize("command, blocked", [("train", "tqdm"), ("demo", "matplotlib"), ("train", "numpy")])
def test_commands_without_the_extra_fail_in_one_line(command, blocked, tmp_path):
    result = _without(blocked, f"""
        from pyfastnn.cli import main
        sys.exit(main([{command!r}, "--help"]))
    """)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr == (f"pyfastnn {command}: error: the pyfastnn lesson needs {blocked}, which is not "
                             f'installed: pip install "pyfastnn[lesson]"\n')


def test_debug_shows_the_traceback_of_a_missing_extra():
    result = _without("tqdm", """
        from pyfastnn.cli import main
        sys.exit(main(["train", "--debug", "--help"]))
    """)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ModuleNotFoundError" in result.stderr


def test_a_missing_module_of_pyfastnn_itself_is_a_broken_install_not_a_missing_extra():
    result = _without("pyfastnn.lesson.plots", """
        from pyfastnn.cli import main
        sys.exit(main(["demo", "--help"]))
    """)
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
    assert "pyfastnn.lesson.plots" in result.stderr.splitlines()[-1] and "pip install" not in result.stderr


@pytest.mark.parametrize("module", ["models", "data", "settings", "train", "checkpoint", "processes", "demo", "plots"])
def test_the_lesson_modules_live_under_pyfastnn_lesson_alone(module):
    assert importlib.import_module(f"pyfastnn.lesson.{module}").__name__ == f"pyfastnn.lesson.{module}"
    with pytest.raises(ModuleNotFoundError, match=f"No module named 'pyfastnn.{module}'"):
        importlib.import_module(f"pyfastnn.{module}")
