"""The CLI lives in the package (scr_jax/cli.py): the `scr-jax` console script
and `experiments/run.py` (a shim) both run `scr_jax.cli.main`."""
import importlib
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_script_names_the_cli_main():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
    scripts = tomllib.load(fh)["project"]["scripts"]
  module, func = scripts["scr-jax"].split(":")
  from scr_jax import cli
  assert getattr(importlib.import_module(module), func) is cli.main


def test_experiments_run_is_a_shim_of_the_package_cli():
  with open(os.path.join(ROOT, "experiments", "run.py")) as fh:
    text = fh.read()
  assert "from scr_jax.cli import main" in text and len(text.splitlines()) <= 12
  # run as the documented entry: the package's parser answers (one line, exit 2)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), "nope"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert res.returncode == 2, res.stderr
  assert "invalid choice: 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_package_cli_parses_every_command():
  from scr_jax import cli
  p = cli.build_parser()
  for cmd in ("data", "prepare", "train", "eval", "predict", "diagnose", "search", "reproduce",
              "main", "import-unsup3d"):
    assert cmd in p.format_help(), cmd
  assert cli.build_parser("scr-jax").prog == "scr-jax"


_STDERR_PRINTS_LEFT = {"cliutil.py"}  # the helper itself


def test_one_stderr_helper():
  """Notes and progress lines go through cliutil.log: no module has its own
  `_log` or prints to stderr itself (except those still listed above)."""
  pkg = os.path.join(ROOT, "scr_jax")
  found = []
  for name in sorted(os.listdir(pkg)):
    if not name.endswith(".py") or name in _STDERR_PRINTS_LEFT:
      continue
    with open(os.path.join(pkg, name)) as fh:
      text = fh.read()
    if "file=sys.stderr" in text or "def _log(" in text:
      found.append(name)
  for name in ("bench_quality.py", "bench_candidates.py"):
    with open(os.path.join(ROOT, "experiments", name)) as fh:
      if "file=sys.stderr" in fh.read():
        found.append(name)
  assert not found, found


def test_log_writes_one_flushed_line_to_the_current_stderr(capsys):
  from scr_jax import cliutil
  cliutil.log("note: x")
  cliutil.log("\rlive", end="")
  assert capsys.readouterr().err == "note: x\n\rlive"


def test_figure_is_an_agg_figure_without_pyplot(tmp_path):
  from scr_jax import visualize
  fig = visualize.figure(3, 2, dpi=50)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [1, 0])
  fig.savefig(tmp_path / "p.png")
  from PIL import Image
  assert Image.open(tmp_path / "p.png").size == (150, 100)
