"""Test setup: CPU, and a persistent compilation cache shared by all tests
and their subprocesses (most test time is XLA compilation of the same small
programs). scr_jax is installed (`pip install -e .`); pytest.ini puts the
repo root on the path for the tests that drive `experiments/` scripts."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# User-report inputs (../shared/cases/user-reports beside the checkout, or
# SCR_CASES_DIR); a test that needs a missing case is skipped, not failed.
CASES = os.environ.get("SCR_CASES_DIR",
                       os.path.join(ROOT, "..", "shared", "cases", "user-reports"))


def user_case(name: str) -> str:
  """Path of one user-report case folder (pytest.skip when absent)."""
  import pytest
  path = os.path.join(CASES, name)
  if not os.path.isdir(path):
    pytest.skip(f"user-report case {name} not found under {CASES}")
  return path
