"""The one error type g2l raises for bad input or state the user can fix."""


class G2LError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do."""


class G2LWarning(UserWarning):
    """Something the user should know before the run goes on (the message says what to do)."""
