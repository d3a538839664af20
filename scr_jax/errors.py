"""User-facing errors: the CLI prints their message as one line, no traceback."""


class UserError(Exception):
  """A mistake in the user's input (data, config, CLI). Message = one line."""


class NonFiniteError(Exception):
  """Training hit a NaN/Inf loss or gradient; the message names the step."""


class StopRequested(Exception):
  """A batch producer's training (`train.fit_workdir`) was stopped by
  SIGINT / SIGTERM after saving its checkpoint: the run did not finish, so
  nothing may be recorded as its result. `signal` is "SIGINT" or "SIGTERM";
  `exit_code` 130 / 143, what the CLI exits with."""

  def __init__(self, signal: str, step: int, workdir: str):
    super().__init__(f"{signal}: stopped at step {step}, checkpoint saved in {workdir}; "
                     "rerun the same command to resume")
    self.signal, self.step, self.workdir = signal, step, workdir
    self.exit_code = 130 if signal == "SIGINT" else 143
