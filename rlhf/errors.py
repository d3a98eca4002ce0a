"""User-facing errors: one clear line on stderr, exit code 2, no traceback.

Anything a user can cause (bad path, bad dataset, bad flag combination) is raised as
``UserError``; scripts wrap ``main`` with ``run_cli`` so those end as one line. Any other
exception is a bug and propagates with its traceback and a non-zero exit.
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""


def fail(message: str) -> "NoReturn":  # noqa: F821 - typing only
    raise UserError(message)


def run_cli(main: Callable[[], object]) -> int:
    """Run a script's ``main``; turn a ``UserError`` into one stderr line and exit code 2.

    If ``main`` returns an int (a launcher passing on its job's exit status), that is the
    exit code; any other return value means success (0).
    """
    try:
        result = main()
    except UserError as error:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "rlhf"
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0
