"""The optional extras, described where they can be read without them: the ``lesson`` extra's
packages, which ``pyfastnn.lesson`` checks on import and the test configuration checks before
collecting the lesson's modules (importing the lesson itself would fail without them).

Example:
    >>> LESSON_REQUIREMENTS
    ('numpy', 'tqdm', 'matplotlib')
    >>> set(missing_lesson_requirements()) <= set(LESSON_REQUIREMENTS)
    True
"""

from __future__ import annotations

import importlib.util
from typing import List

__all__ = ["LESSON_REQUIREMENTS", "LESSON_INSTALL_COMMAND", "missing_lesson_requirements"]

#: The packages the lesson needs beyond the library's (the ``lesson`` extra in setup.py).
LESSON_REQUIREMENTS = ("numpy", "tqdm", "matplotlib")
LESSON_INSTALL_COMMAND = 'pip install "pyfastnn[lesson]"'


def missing_lesson_requirements() -> List[str]:
    """The lesson's packages that cannot be imported here (found without importing them)."""
    return [name for name in LESSON_REQUIREMENTS if importlib.util.find_spec(name) is None]
