"""What every command-line entry point shares: argparse with a one-line
error, the one-line `error: ...` exit, and notes on stderr."""
from __future__ import annotations

import argparse
import os
import sys


def log(msg: str):
  """A note or progress line for people (stderr, flushed)."""
  print(msg, file=sys.stderr, flush=True)


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
