"""Agent tasks with checkable answers, built from a real source tree or a case-file folder: the questions of
scripts/agent_traces.py (training traces) and benchmarks/agent_eval.py (the evaluation), which draw them from
disjoint trees (distill.py's package split: the evaluation only from held-out packages).

Kinds, each answered by one real tool call whose result holds the answer:
  where     "Where is X defined?"            grep (class|def) X -> the one file that defines it
  returns   "What does f return?"            grep def f -> the signature's return annotation
  uses      "Which files use X?"             grep \\bX\\b -> every file (2 to 4) that names it
  value     "What is NAME set to?"           grep ^NAME = -> the constant's value and file
  raises    "What does f raise?"             read_file of f's lines -> the one exception class f raises (throws)
  document  "Which document and page say .." grep "<phrase>" -> file and [page N] / [section] anchor

A task's `expect` is a list of groups of strings: the answer is exact when each group has a member that appears in
it (compared without case, spaces and backticks).

The parts: agent_tasks_core.py (Task, exact, the check against the real tools), agent_tasks_code.py (the code
questions), agent_tasks_cases.py (the case-file folders), agent_tasks_sources.py (the source trees: copies, registry
downloads); this module is their one entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the parts beside this file (also when this file is loaded by path)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_tasks_cases import THEMES, WORDS, case_folder  # noqa: E402
from agent_tasks_code import LANGUAGES, RegexLanguage, code_tasks, python_tasks, raise_tasks  # noqa: E402
from agent_tasks_core import KINDS, Task, exact, run_calls  # noqa: E402
from agent_tasks_sources import copy_package, fetched_dir, npm_package_dir  # noqa: E402

__all__ = [  # what scripts/agent_traces.py, benchmarks/agent_eval.py and the tests use
    "KINDS",
    "LANGUAGES",
    "THEMES",
    "WORDS",
    "RegexLanguage",
    "Task",
    "case_folder",
    "code_tasks",
    "copy_package",
    "exact",
    "fetched_dir",
    "npm_package_dir",
    "python_tasks",
    "raise_tasks",
    "run_calls",
]
