"""The errors a program reports as one line instead of a traceback (config.cli.run_main).

They live here, below everything that raises or catches them, so that the command line, the
engine and the data packages can all import them without importing each other.
"""


class UsageError(ValueError):
    """A flag combination or input that cannot work; reported as one line before any compute (exit 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is damaged, or is unsafe to load (exit 1)."""


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, inconsistent)."""
