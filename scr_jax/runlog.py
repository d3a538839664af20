"""Run logging: progress line, CSV of scalars, tensorboard event files."""
from __future__ import annotations

import csv
import os
import time

import numpy as np

from scr_jax import cliutil


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLog:
  """Writes scalars to workdir/metrics.csv and tensorboard, prints progress."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int, quiet: bool = False):
    from tensorboardX import SummaryWriter
    self.workdir = workdir
    self.total = total_steps
    self.batch_size = batch_size
    self.quiet = quiet
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self._t0 = None
    self._s0 = None

  def scalars(self, step: int, values: dict, prefix: str = "train"):
    row = {f"{prefix}/{k}": float(v) for k, v in values.items()}
    for k, v in row.items():
      self.tb.add_scalar(k, v, step)
    new = not os.path.exists(self.csv_path)
    with open(self.csv_path, "a", newline="") as fh:
      w = csv.writer(fh)
      if new:
        w.writerow(["step", "key", "value"])
      for k, v in row.items():
        w.writerow([step, k, f"{v:.6g}"])

  def images(self, step: int, name: str, grid_HxWx3):
    self.tb.add_image(name, np.clip(np.asarray(grid_HxWx3), 0, 1), step, dataformats="HWC")

  def progress(self, step: int, loss: float, extra: str = ""):
    now = time.time()
    if self._t0 is None:
      self._t0, self._s0 = now, step
      rate, eta = float("nan"), ""
    else:
      done = max(step - self._s0, 1)
      rate = done * self.batch_size / max(now - self._t0, 1e-9)
      eta = _fmt_time((self.total - step) * (now - self._t0) / done)
    if not self.quiet:
      cliutil.log(f"step {step:>6}/{self.total} | loss {loss:8.4f} | {rate:7.1f} img/s"
                  f" | ETA {eta or '?':>6}{' | ' + extra if extra else ''}")

  def close(self):
    self.tb.flush()
    self.tb.close()
