"""Errors that are an expected way for a run to end, as opposed to bugs.

The CLIs print such an error (and any `ValueError`: bad config, data or checkpoint) as one line
naming the problem and exit non-zero; the traceback goes to the run's log file at debug level.
"""


class RunError(RuntimeError):
    """A run cannot go on: non-finite losses in a row, no checkpoint that restores, ..."""
