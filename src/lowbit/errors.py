"""User-facing errors: one exception type whose message names the problem and the fix."""


class LowbitError(Exception):
    """Bad input or an unrecoverable condition the user can fix.

    The CLI prints the message as one line and exits non-zero; it never shows a traceback for these.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line error messages that quote a library's error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
