"""One exception type for every mistake a user can make.

Entry points catch :class:`UserError`, print its message (which names the problem *and* the
fix) and exit non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""

import sys
from typing import NoReturn


class UserError(Exception):
    """A problem the user can fix: bad config, missing data, a foreign checkpoint, ..."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: training stops, the last good checkpoint is kept."""


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """The user-fixable error behind ``exc``, following ``raise ... from`` chains (Hydra's
    ``instantiate`` wraps exceptions raised by the objects it builds). Lightning's
    ``MisconfigurationException`` counts too: it names a bad trainer setting. (Looked up only
    where Lightning is loaded: ``generate.py`` never imports it, and must not for an error.)"""
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    kinds = (UserError,)
    if lightning_errors is not None:
        kinds = (UserError, lightning_errors.MisconfigurationException)

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def fail(message: str) -> NoReturn:
    """End the process on a user error: one clear line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
