"""Test setup: CPU, and a persistent compilation cache shared by all tests
and their subprocesses (most test time is XLA compilation of the same small
programs). scr_jax is installed (`pip install -e .`); pytest.ini puts the
repo root on the path for the tests that drive `experiments/` scripts."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from scr_jax import data, parallel  # noqa: E402


# User-report inputs (../shared/cases/user-reports beside the checkout, or
# SCR_CASES_DIR); a test that needs a missing case is skipped, not failed.
CASES = os.environ.get("SCR_CASES_DIR",
                       os.path.join(ROOT, "..", "shared", "cases", "user-reports"))


def user_case(name: str) -> str:
  """Path of one user-report case folder (pytest.skip when absent)."""
  path = os.path.join(CASES, name)
  if not os.path.isdir(path):
    pytest.skip(f"user-report case {name} not found under {CASES}")
  return path


@pytest.fixture(scope="session")
def tiny_synface(tmp_path_factory):
  """A synface-layout folder (train 24 / val 8 / test 8 images at 16 px, with
  depth and ground-truth sidecars), generated once per session."""
  root = str(tmp_path_factory.mktemp("tiny_synface"))
  data.export_synface(root, n_train=24, n_val=8, n_test=8, size=16, seed=3, verbose=False)
  return root


@pytest.fixture(autouse=True, scope="module")
def _free_programs_after_module():
  yield
  parallel.release_programs()  # one process for the suite: stay under vm.max_map_count
