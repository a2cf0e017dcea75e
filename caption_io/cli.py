"""What every command of the project shares at its edge.

Each command is a main(argv=None) -> int decorated with `command`, which runs it through
`run`. So every command, the same way:
  - has its flags parsed by `Parser`: a bad flag is one line and exit 2, and --verbose exists;
  - reports a user's mistake (a `UserError`: a missing file, a full disk, a job that cannot be
    exported...) as one line, `error: <what is wrong>`, on stderr, with the error's exit code,
    and a bug (any other exception) with its traceback;
  - stops on Ctrl-C with one line and exit 130;
  - logs through `setup_logging`: progress and logs on stderr, results on stdout;
  - starts quietly (caption_io.quiet): TensorFlow's start-up lines stay out of the terminal.
The error classes stay in their own modules, each a UserError, so that the code raising one
needs no knowledge of the command line; only the edge turns them into output.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys

from caption_io import quiet

INTERRUPTED = "interrupted"
LOG_FORMAT = "%(message)s"
VERBOSE_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The project's own loggers log progress at INFO; everyone else's only from WARNING.
# "__main__": a command run as `python -m pipelines.preprocess` logs through it.
PROJECT_LOGGERS = ("caption_io", "caption_serving", "caption_eval", "model", "pipelines", "trainer", "__main__")

_verbose = False


class UserError(Exception):
    """Something the user can fix (a flag, a file, a full disk), not a bug: the command prints
    `error: ` + str() (one readable line, no traceback) and exits with `exit_code`.

    Subclasses keep their other bases (ValueError, OSError...), so code that catches those
    still does; a subclass whose command exits otherwise sets its own exit_code."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """An error's message on one line (an error line is one line, whatever the message holds)."""
    return " ".join(str(e).split()) or type(e).__name__


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass


def run(main, argv=None, *, interrupted: str = INTERRUPTED) -> int:
    """Run a command's body main(argv) -> exit status (None: 0) the way every command ends.

    A UserError: `error: <message>` on stderr, its exit_code. Ctrl-C (KeyboardInterrupt):
    `error: <interrupted>`, 130 (128 + SIGINT, as a shell reports it). Anything else is a bug
    and propagates with its traceback. argv None means the process runs this command
    (its flags are sys.argv[1:]): the quiet start goes in first, before the body can import
    TensorFlow; with an argv (tests, other code) the process's stderr is left as it is."""
    if argv is None:
        quiet.install()
        argv = sys.argv[1:]
    argv = list(argv)
    setup_logging(quiet.verbose_requested(argv))
    try:
        code = main(argv)
    except UserError as e:
        _flush(sys.stdout)  # results printed so far come before the error line
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _flush(sys.stdout)
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


def command(main=None, *, interrupted: str = INTERRUPTED):
    """Decorator for a command's main(argv=None): the same function, run through `run`.

    `interrupted`: the line after `error: ` on Ctrl-C (a resumable command says how to resume)."""
    def wrap(fn):
        @functools.wraps(fn)
        def entry(argv=None) -> int:
            return run(fn, argv, interrupted=interrupted)
        return entry
    return wrap(main) if main is not None else wrap


# ------------------------------------------------------------------------------------ logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a handler holding the stream it
    was made with would write into a closed one once tests swap sys.stderr)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(verbose: bool = False) -> None:
    """The one logging setup of every command: records on stderr (stdout is for results),
    the project's loggers from INFO (its progress lines) and everyone else's from WARNING,
    as bare messages; verbose: everything from DEBUG, with time, level and logger.

    Calling it again replaces what it set up (and only that): handlers others added stay."""
    global _verbose
    _verbose = bool(verbose)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _StderrHandler):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(VERBOSE_LOG_FORMAT if verbose else LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # TensorFlow gives its logger a handler of its own when it is imported before this
    # runs: its records would show twice. They keep TensorFlow's format and show once.
    tf_logger = logging.getLogger("tensorflow")
    if tf_logger.handlers:
        tf_logger.propagate = False


def is_verbose() -> bool:
    """Whether this command runs with --verbose (or CAPTIONER_VERBOSE=1)."""
    return _verbose


# -------------------------------------------------------------------------------------- flags
class _Verbose(argparse.Action):
    """--verbose: debug logging from the moment it is parsed. (The quiet start, which must come
    before the flags are parsed, reads the same flag from the command line: caption_io.quiet.)"""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        if not _verbose:
            setup_logging(True)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one readable line (no usage dump) and exit 2, and every
    command has --verbose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(quiet.VERBOSE_FLAG, action=_Verbose,
                          help="debug logging, and TensorFlow's start-up messages (also: "
                               f"{quiet.VERBOSE_ENV}=1)")

    def error(self, message):
        message = " ".join(str(message).split())  # argparse messages can span lines
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
