"""User-facing errors: one clear line on stderr, exit code 2, no traceback.

Anything a user can cause (bad path, bad dataset, bad flag combination) is raised as
``UserError``; scripts wrap ``main`` with ``run_cli`` so those end as one line. Any other
exception is a bug and propagates with its traceback and a non-zero exit.
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


EXIT_DIVERGED = 3


class UserError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


class TrainingDiverged(Exception):
    """A loss, reward or KL became NaN/inf; the message names the step, the quantity and the way out."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written. ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(main: Callable[[], object]) -> int:
    """Run a script's ``main``; turn a ``UserError`` into one stderr line and exit code 2.

    If ``main`` returns an int (a launcher passing on its job's exit status), that is the
    exit code; any other return value means success (0).
    """
    try:
        result = main()
    except UserError as error:
        print(f"{_prog()}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except TrainingDiverged as error:
        print(f"{_prog()}: stopped: {error}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Interrupted as error:
        print(f"{_prog()}: interrupted: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


def _prog() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "rlhf"
