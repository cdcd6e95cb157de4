"""The one exception type for errors a user can cause (bad path, flag, block, image...)."""


class DiffprobeError(Exception):
    """Raised with a message that says what was expected and how to fix it.

    The CLI prints it on one line and exits with status 2; anything else is a bug.
    """
