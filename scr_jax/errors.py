"""User-facing errors: the CLI prints their message as one line, no traceback."""


class UserError(Exception):
  """A mistake in the user's input (data, config, CLI). Message = one line."""


class NonFiniteError(Exception):
  """Training hit a NaN/Inf loss or gradient; the message names the step."""
