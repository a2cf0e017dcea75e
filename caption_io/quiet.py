"""A quiet start: TensorFlow's C++ start-up lines kept out of a command's terminal.

Importing TensorFlow and running its first op write a handful of lines that tell a user
captioning a photo nothing (oneDNN is on, no CUDA driver, cuInit failed, CPU instructions
this build does not use, absl's "before InitializeLog" notice), ahead of the one line they
asked for. C++ writes them straight to file descriptor 2, and before absl's logging is
initialised, so TF_CPP_MIN_LOG_LEVEL does not hide them all and Python's sys.stderr never
sees them: only the file descriptor itself can be filtered.

install(), called before TensorFlow is imported (caption_io.cli.command does it for a
command's main() run as the process entry, and each command module does it first thing
under `if __name__ == "__main__":`), points fd 2 at a pipe, or, when stderr is a terminal,
at a pseudo-terminal of the same size, so that isatty() stays true and progress bars still
draw. A small filter process reads the other end and writes everything to the real stderr
as it arrives, byte for byte, except whole lines that is_start_up recognises (those lines
and no others). A partial line (a progress bar's \\r update, a prompt) is passed on at once unless
it could be the start of a start-up line; then it waits for its newline, HOLD_S at most.

A process rather than a thread, because it outlives the command's own ending: a C++ abort
(a failed CHECK), a segfault or os._exit would take a thread down with the lines still in
the pipe, which are the ones that explain the crash; the filter reads until the last
writer has gone. Child processes inherit fd 2 like any stderr and are filtered the same
way; one that outlives the command keeps its stderr. The filter runs in its own session,
so Ctrl-C or a SIGTERM to the job reaches the command (which prints why it stopped) and
not the filter. At exit (atexit, after tracebacks are printed) fd 2 is put back and the
filter is given EXIT_WAIT_S to write what it holds, so no line is lost and the shell prompt
comes after the last one.

--verbose (spelt out, before any `--`) or CAPTIONER_VERBOSE=1 installs nothing: every start-up
line shows. TF_CPP_MIN_LOG_LEVEL's default of 2 (INFO and WARNING lines logged after start-up
hidden) is set by caption_io/__init__.py for commands and library use alike, except with
CAPTIONER_VERBOSE=1; a user's own setting wins.

Standard library only: the filter process runs this file as a script (python -I -S).
"""
from __future__ import annotations

import atexit
import os
import re
import select
import sys

VERBOSE_ENV = "CAPTIONER_VERBOSE"
VERBOSE_FLAG = "--verbose"
HOLD_S = 0.1       # how long a partial line that may be a start-up line waits for its end
EXIT_WAIT_S = 3.0  # how long the command's exit waits for the filter to write what it holds

# absl's line prefix: severity, MMDD, time (before absl is initialised: 0000 00:00:<epoch>),
# thread id, file:line]
_ABSL = re.compile(rb"[IWEF]\d{4} [\d:.]+ +\d+ (?P<file>[\w.+-]+):\d+\] (?P<message>.*)")
# (source file, message start) of the start-up lines that absl prefixes.
_ABSL_START_UP = tuple((re.compile(f), re.compile(m)) for f, m in (
    (rb"port\.cc", rb"oneDNN custom operations are on"),
    (rb"cudart_stub\.cc", rb"Could not find cuda drivers on your machine|Could not load dynamic library"
                          rb"|Ignore above cudart dlerror"),
    (rb"cpu_feature_guard\.cc", rb"This TensorFlow binary is optimized to use available CPU instructions"),
    (rb"cuda_(platform|executor|driver)\.cc", rb"failed call to cuInit"),
    (rb"cuda_diagnostics\.cc", rb"retrieving CUDA diagnostic information|hostname:|libcuda reported version"
                               rb"|kernel reported version|kernel version seems to match|kernel driver does not"
                               rb"|/proc/driver/nvidia/version does not exist"),
    (rb"cuda_(dnn|fft|blas)\.cc", rb"Unable to register cu\w+ factory: Attempting to register factory"),
    (rb"computation_placer\.cc", rb"computation placer already registered"),
    (rb"py_utils\.cc", rb"TF-TRT Warning: Could not find TensorRT"),
    # Once, at the first float16 op on a CPU without AVX-512 (the stored features are float16):
    # Eigen's kernel runs instead, which is what this machine can do; nothing to act on.
    (rb"util\.cc", rb"oneDNN supports DT_HALF only on platforms with AVX-512"),
))
# Start-up lines without absl's prefix (the second line of cpu_feature_guard's message).
_PLAIN_START_UP = (
    re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(rb"To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\."),
    # LiteRT's interpreter, each time one is made (caption --model X.tflite): it runs on the CPU.
    re.compile(rb"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."),
)
_PLAIN_STARTS = (b"WARNING: All log messages before absl::InitializeLog()", b"To enable the following instructions:",
                 b"INFO: Created TensorFlow Lite XNNPACK delegate")
_MAYBE_ABSL = re.compile(rb"[IWEF](\d{0,3}|\d{4}( .*)?)", re.S)

_state = None  # (filter process, saved fd of the real stderr) while installed


def is_start_up(line: bytes) -> bool:
    """Whether a whole line (its newline included or not) is one of TensorFlow's start-up lines."""
    line = line.rstrip(b"\r\n")
    m = _ABSL.fullmatch(line)
    if m:
        return any(f.fullmatch(m["file"]) and msg.match(m["message"]) for f, msg in _ABSL_START_UP)
    return any(p.fullmatch(line) for p in _PLAIN_START_UP)


def _may_be_start_up(partial: bytes) -> bool:
    """Whether a line begun but not ended could still turn out to be a start-up line."""
    if _MAYBE_ABSL.fullmatch(partial):
        return True
    return any(s.startswith(partial) or partial.startswith(s) for s in _PLAIN_STARTS)


def verbose_requested(argv=None) -> bool:
    """--verbose among a command's own flags (before `--`), or CAPTIONER_VERBOSE set to 1/true/yes/on."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argv[:argv.index("--")] if "--" in argv else argv
    return VERBOSE_FLAG in own


def installed() -> bool:
    return _state is not None


def install(argv=None) -> bool:
    """Filter fd 2 from here on (see the module's docstring); -> whether the filter is on.

    Call before TensorFlow is imported. Does nothing when verbose output is asked for,
    when it is already on, when fd 2 is closed, or off POSIX."""
    global _state
    if _state is not None:
        return True
    if verbose_requested(argv):
        return False
    if os.name != "posix":
        return False
    try:
        os.fstat(2)
    except OSError:
        return False
    import subprocess

    if not sys.executable:
        return False
    try:
        read_end, write_end = _tty_pair() if os.isatty(2) else os.pipe()
    except OSError:  # no pseudo-terminal to be had
        read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=read_end,
                                stdout=2, stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return False
    os.close(read_end)
    for stream in (sys.stderr, sys.__stderr__):
        _flush(stream)
    saved = os.dup(2)
    os.dup2(write_end, 2)  # inheritable: child processes write through the filter too
    os.close(write_end)
    _state = (proc, saved)
    atexit.register(_restore)
    return True


def _tty_pair() -> tuple[int, int]:
    """(master, slave) of a pseudo-terminal that writes bytes as given (no \\n -> \\r\\n)
    and has the real terminal's size."""
    import fcntl
    import termios

    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(2, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass
    return master, slave


def _flush(stream) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass


def _restore() -> None:
    """At exit: the real stderr back on fd 2, and the filter's last lines written."""
    global _state
    if _state is None:
        return
    proc, saved = _state
    _state = None
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):
        _flush(stream)
    os.dup2(saved, 2)
    os.close(saved)
    try:
        proc.wait(timeout=EXIT_WAIT_S)
    except Exception:
        pass


# ------------------------------------------------------------------------------ the filter
def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def run_filter(src: int = 0, dst: int = 1) -> None:
    """Copy `src` to `dst` until every writer has gone, leaving out START_UP lines."""
    held = b""        # the start of a line that may be a start-up line
    passing = False   # the current line was already judged (and partly written): pass the rest
    while True:
        if held:
            ready, _, _ = select.select([src], [], [], HOLD_S)
            if not ready:  # not completed in time: not a start-up line
                _write(dst, held)
                held, passing = b"", True
                continue
        try:
            data = os.read(src, 65536)
        except OSError:  # EIO: the pseudo-terminal's last writer has gone
            data = b""
        if not data:
            _write(dst, held)
            return
        while data:
            if passing:
                end = data.find(b"\n") + 1
                _write(dst, data[:end] if end else data)
                data, passing = (data[end:], False) if end else (b"", True)
                continue
            data, held = held + data, b""
            end = data.find(b"\n") + 1
            if not end:
                if _may_be_start_up(data):
                    held = data
                else:
                    _write(dst, data)
                    passing = True
                break
            line, data = data[:end], data[end:]
            if not is_start_up(line):
                _write(dst, line)


if __name__ == "__main__":
    try:
        run_filter()
    except OSError:  # the real stderr was closed (a pipe whose reader went away)
        pass
