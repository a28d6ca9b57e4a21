"""The one error type the user sees, and the exit codes it carries.

A `QtuneError` is a mistake the user can fix (a recipe key, a data file, the
environment).  `qtune.cli.main` prints it as one line and exits with its code;
anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes, documented in the README ("When things go wrong").
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug in qtune or a library
EXIT_RECIPE = 2  # recipe or command-line usage
EXIT_DATA = 3  # dataset files, columns, formats, masking
EXIT_ENVIRONMENT = 4  # model not found, GPU, disk, missing package, permissions
EXIT_INTEGRITY = 5  # checkpoint or export integrity
EXIT_PIPE_CLOSED = 141  # the reader of stdout closed the pipe (`| head`), as a shell reports SIGPIPE
EXIT_INTERRUPTED = 75  # stopped by SIGTERM / Ctrl-C after saving a checkpoint: resume with --resume (EX_TEMPFAIL)


class QtuneError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None, code: int = EXIT_RECIPE):
        self.what = what
        self.where = where
        self.fix = fix
        self.code = code
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f" — {self.fix}"
        # One line, whatever the message carried in.
        return " ".join(text.split())


class RecipeError(QtuneError):
    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_RECIPE)


class DataError(QtuneError):
    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_DATA)


class EnvironmentProblem(QtuneError):
    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_ENVIRONMENT)
