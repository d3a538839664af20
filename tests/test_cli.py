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

