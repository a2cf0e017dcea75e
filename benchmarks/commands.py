"""Running the project's commands from a benchmark: each printed, timed, and skipped where its
last output is already there (so a long benchmark can be resumed)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], what: str) -> float:
    """Run `cmd` from the repository's root; exit with its last error lines if it fails. -> seconds."""
    print("$", shlex.join(cmd[1:]), file=sys.stderr, flush=True)
    began = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.time() - began


def step(done: str, cmd: list[str], what: str) -> float | None:
    """Run `cmd` unless `done` (a file it writes last) is there. -> its seconds, or None if reused."""
    return None if os.path.exists(done) else run(cmd, what)
