"""The errors a program reports as one line instead of a traceback (config.cli.run_main).

They live here, below everything that raises or catches them, so that the command line, the
engine and the data packages can all import them without importing each other.
"""


class UsageError(ValueError):
    """A flag combination or input that cannot work; reported before any compute (exit 2). One
    problem is one line; ``UsageError.many`` lists every problem a command line has in one message,
    so that a user fixes them all in one attempt (``problems``: each on its own)."""

    def __init__(self, message: str = "", problems: "list[str] | None" = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]

    @classmethod
    def many(cls, problems: "list[str]") -> "UsageError":
        """One error for ``problems`` (one line each): the line itself when there is one."""
        if len(problems) == 1:
            return cls(problems[0])
        return cls(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems), problems)


class CheckpointError(RuntimeError):
    """A checkpoint that does not exist, is damaged, or is unsafe to load (exit 1)."""


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, inconsistent)."""


def error_line(e: BaseException) -> str:
    """An error's message on one line. For an error raised in a DataLoader worker, torch re-raises it in
    the main process with the worker's whole traceback as its text; the worker's own message is its last
    entry (``<module>.<ErrorName>: <message>``), and is what is returned."""
    text = str(e).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[i].partition(": ")
            if sep and head.rsplit(".", 1)[-1] == type(e).__name__:
                text = " ".join([rest, *lines[i + 1:]])
                break
    return " ".join(text.split()) or type(e).__name__
