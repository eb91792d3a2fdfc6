"""Errors that a user can act on: each message says what went wrong and what to do."""
import sys


class UserError(Exception):
    """A problem in the user's input (paths, config, checkpoints), reported without a traceback."""

    exit_code = 2


class OutputError(UserError):
    """A file of the run cannot be written or read (disk full, no permission): the environment
    failed, not the user's input, so the command exits with 1 instead of 2."""

    exit_code = 1


def describe_os_error(exc: OSError) -> str:
    """`<file>: <reason>` for an OSError (e.g. "out/log.txt: No space left on device")."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def output_failed(path: str, exc: OSError, kept: str = "") -> OutputError:
    """The error for an output of the run that could not be written."""
    return OutputError(
        f"Could not write {path}: {exc.strerror or exc}.{kept} Free disk space (or make the folder "
        "writable), then run the same command again: training resumes from the last checkpoint "
        "saved in --output-dir.")


def run_command(prog: str, run, args, interrupted: str = "interrupted") -> int:
    """A command's `run(args)` with a user's error as one line on stderr (`prog: error: ...`, its
    exit code) and Ctrl-C as `prog: <interrupted>` (130), no traceback."""
    try:
        return run(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return 130
