"""Test collection for the whole repository (the tests and the package's docstring examples).

The lesson is an optional extra: without its packages (``pip install "pyfastnn[lesson]"``) its
modules cannot be imported, so its docstrings and its tests are not collected, and the library's
tests still run.
"""

from pyfastnn.extras import missing_lesson_requirements

collect_ignore_glob = ["pyfastnn/lesson/*", "tests/lesson/*"] if missing_lesson_requirements() else []
