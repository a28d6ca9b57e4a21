"""The one error type the user sees, and the exit codes it carries.

A `QtuneError` is a mistake the user can fix (a recipe key, a data file, the
environment).  `qtune.cli.main` prints it as one line and exits with its code;
anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes, documented in docs/troubleshooting.md (a test checks every code is there).
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a bug in qtune or a library
EXIT_RECIPE = 2  # recipe or command-line usage
EXIT_DATA = 3  # dataset files, columns, formats, masking
EXIT_ENVIRONMENT = 4  # model not found, GPU, disk, missing package, permissions
EXIT_INTEGRITY = 5  # checkpoint or export integrity
EXIT_DIVERGED = 6  # training stopped: the loss was NaN or infinite for train.max_nonfinite_steps steps in a row
EXIT_FIDELITY = 7  # an exported artifact fails the fidelity gate (NaN, or top-1 agreement under its format's floor)
EXIT_PIPE_CLOSED = 141  # the reader of stdout closed the pipe (`| head`), as a shell reports SIGPIPE
EXIT_INTERRUPTED = 75  # stopped by SIGTERM / Ctrl-C after saving a checkpoint: resume with --resume (EX_TEMPFAIL)


class QtuneError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it, with its exit code."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None, code: int = EXIT_RECIPE):
        self.what = what
        self.where = where
        self.fix = fix
        self.code = code
        super().__init__(self.line())

    def line(self) -> str:
        """The error as the one line the command prints: what (where) — how to fix."""
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f" — {self.fix}"
        # One line, whatever the message carried in.
        return " ".join(text.split())


class RecipeError(QtuneError):
    """A mistake in the recipe or the command line (exit 2)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_RECIPE)


class DataError(QtuneError):
    """A mistake in the data (exit 3)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_DATA)


class EnvironmentProblem(QtuneError):
    """Something missing or wrong around the run: model, disk, network, GPU, package (exit 4)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix, code=EXIT_ENVIRONMENT)


def hub_failure(action: str, target: str, error: Exception, *, fix: str | None = None) -> QtuneError:
    """A Hub request that failed (huggingface_hub / httpx errors, or transformers' OSError around them) as one
    exit-4 line: a token without access, another HTTP status, or no answer at all."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        what, default_fix = (
            f"the token may not write to {target} (HTTP {status})",
            "use a token with write access to that repo",
        )
    elif status is not None:
        what, default_fix = f"the Hub answered HTTP {status}", "try again later"
    elif isinstance(error, (OSError, ValueError)) and not isinstance(error, ConnectionError) and str(error):
        what, default_fix = str(error).splitlines()[0], "check the network; local files are untouched"
    else:
        what, default_fix = (
            f"cannot reach the Hub ({type(error).__name__})",
            "check the network; local files are untouched",
        )
    return QtuneError(f"{action} {target} failed: {what}", fix=fix or default_fix, code=EXIT_ENVIRONMENT)
