"""What every command of the project shares at its edge: flag errors as one line."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one readable line (no usage dump) and exit 2."""

    def error(self, message):
        message = " ".join(str(message).split())  # argparse messages can span lines
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
