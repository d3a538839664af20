"""What every command-line entry point shares: argparse with a one-line
error, the one-line `error: ...` exit, and `log`, the one way notes and
progress lines reach stderr (library modules use it too; this module imports
nothing of scr_jax, so any module may)."""
from __future__ import annotations

import argparse
import os
import sys


def log(msg: str, end: str = "\n"):
  """A note or progress line for people: stderr (whatever sys.stderr is at
  the call: tests capture it, `fail` silences it), flushed. end="" for a live
  line redrawn with a leading carriage return."""
  print(msg, end=end, file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
  """argparse with a one-line error (no usage dump); exit status 2."""

  def error(self, message):
    self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def fail(err, code: int):
  """One line, then exit; teardown noise (e.g. a tensorboard flush on a full
  disk, printed from atexit or threads) goes to /dev/null."""
  print(f"error: {err}", file=sys.stderr, flush=True)
  sys.stderr = open(os.devnull, "w")
  sys.exit(code)
