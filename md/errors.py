"""The one exception type for bad user input in :mod:`md`.

Every :class:`MDInputError` message names the problem *and* the fix; the CLI prints it
as ``oreo-md: error: <message>`` and exits with status 2.
"""


class MDInputError(ValueError):
    """A user-facing input error (bad argument, missing file, inconsistent run directory)."""
