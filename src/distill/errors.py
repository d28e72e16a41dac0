"""The one exception type Distill shows to people.

Anything a user can fix (a missing file, a bad field, an unreachable model) is raised as a
`DistillError` whose message names the file, line or field and says what to do. The CLI prints
that message alone and exits non-zero; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class DistillError(Exception):
    """An error caused by input the user can fix; its message is meant to be read by a person."""

    exit_code = 2


class GateFailed(DistillError):
    """The deploy gate in `evaluation.gate` was not met; the message lists the failed thresholds."""

    exit_code = 3
