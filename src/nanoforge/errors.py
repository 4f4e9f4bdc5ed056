"""One exception type for every mistake a user can make.

Entry points catch :class:`UserError`, print its message (which names the problem *and* the
fix) and exit non-zero without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: bad config, missing data, a foreign checkpoint, ..."""
