"""The one exception type for mistakes a user can fix (a bad file, flag or path).

The CLI prints a `UserError` as one paragraph and exits with status 2, without a traceback.
Anything else is a bug in chatlora and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, worded so the user knows what to change."""
