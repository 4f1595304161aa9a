"""One exception type for every user-facing failure.

The CLI turns a LowbitError into a single line on stderr and exit code 2, so the
message must name the file, tensor or option at fault and say how to fix it.
"""


class LowbitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
