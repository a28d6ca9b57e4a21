"""The command line: parse the arguments (qtune.cli.parser), run the command (qtune.cli.commands), and turn a user's
mistake into one line, `qtune: error: what (where) — how to fix`, with its exit code."""

from __future__ import annotations

import os
import sys

from qtune.cli.commands import COMMANDS
from qtune.cli.parser import build_parser
from qtune.core.cuda_setup import use_expandable_segments
from qtune.core.errors import EXIT_PIPE_CLOSED, QtuneError


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (a user's mistake: one line on stderr, no traceback unless --debug)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except QtuneError as error:
        if debug:
            raise
        print(f"qtune: error: {error.line()}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The `qtune` program: main() with the process set up (signals, the CUDA allocator) and its exit code."""
    import signal

    # A file-size limit (ulimit -f) otherwise kills the process mid-write with SIGXFSZ; ignored, the write fails
    # with EFBIG and is reported like a full disk, with the half-written file cleaned up.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    use_expandable_segments()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`qtune memory M --json | head -1`): nothing more to say, and Python would print a
        # traceback when it flushes stdout at exit, so stdout goes to /dev/null first. 141 is what a shell reports
        # for a command ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_PIPE_CLOSED
    sys.exit(code)
