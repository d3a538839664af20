"""A checkpoint step is committed whole or not at all (issue 22): a process
killed at any point of `workdir.Run.save` (real orbax, a real subprocess
ended with os._exit) leaves a workdir whose restore (what eval, predict and
a resume read) sees either the previous step with its own settings and data
state, or the new step with its own, never a step without settings. Older
step layouts (orbax's single `default` item with side JSON files) still
restore."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scr_jax import checkpoint, config, structure, train_step, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = config.get_config("test_tiny")
ST = structure.resolve_structure(CFG)

# The save a training step makes: a resumed run saving step 2 with its settings
# (marked with the step in `trained_by`) and its data iterator state. FAULT
# names where the process dies (os._exit: no cleanup, as a SIGKILL):
#   before  on entering orbax's CheckpointManager.save (nothing written yet)
#   items   when orbax starts writing the settings item (the state may be partly
#           written in the step's temporary folder)
#   rename  just before the temporary step folder is renamed into place (every
#           item written, the commit marker too)
#   after   just after that rename (the commit), before save() returns
_CHILD = r"""
import asyncio, os, sys
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import async_path
from scr_jax import config, structure, train_step, workdir

wd, fault = sys.argv[1], sys.argv[2]
cfg = config.get_config("test_tiny")
st = structure.resolve_structure(cfg)

def die():
  sys.stdout.flush()
  os._exit(17)

if fault == "before":
  ocp.CheckpointManager.save = lambda *a, **k: die()
elif fault == "items":
  ocp.handlers.JsonCheckpointHandler.async_save = lambda *a, **k: die()
else:
  real = async_path.rename
  async def rename(src, dst):
    step_dir = os.path.basename(str(dst)) == "2"
    if step_dir and fault == "rename":
      die()
    out = await real(src, dst)
    if step_dir and fault == "after":
      die()
    return out
  async_path.rename = rename

nets, state = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
state = train_step.new_state(nets, cfg, jax.tree_util.tree_map(lambda x: x + 2.0, state.params), 2)
with workdir.Run.open(wd, cfg, st, dict(spec="tiny"), extra=dict(trained_by="save 2"),
                      log=None) as run:
  run.save(state, dict(marker=2))
print("saved, not killed")
"""


def _state(step):
  nets, state = train_step.init_state(CFG, jax.random.PRNGKey(CFG.seed))
  params = jax.tree_util.tree_map(lambda x: x + float(step), state.params)
  return train_step.new_state(nets, CFG, params, step)


@pytest.fixture(scope="module")
def step1(tmp_path_factory):
  """A workdir holding step 1 (its settings marked 'save 1', data marker 1)."""
  wd = str(tmp_path_factory.mktemp("atomic") / "w1")
  with workdir.Run.open(wd, CFG, ST, dict(spec="tiny"), extra=dict(trained_by="save 1"),
                        log=None) as run:
    run.save(_state(1), dict(marker=1))
    run.write_files()
  return wd


def _check_whole(wd, capfd):
  """The newest step as eval sees it, and that it carries its own settings."""
  capfd.readouterr()
  r = workdir.restore(wd)
  err = capfd.readouterr().err
  assert "without its settings" not in err, err
  assert r.settings["step"] == r.step and r.settings["trained_by"] == f"save {r.step}"
  # the parameters are the ones saved at that step (init + step)
  _, ref = train_step.init_state(CFG, jax.random.PRNGKey(CFG.seed))
  got = jax.tree_util.tree_leaves(r.params)[0]
  want = jax.tree_util.tree_leaves(ref.params)[0] + float(r.step)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  run = workdir.Run.read(wd)
  assert run.step == r.step and run.data_state(r.step) == dict(marker=r.step)
  assert workdir.load_config(wd) == r.cfg
  return r.step


@pytest.mark.parametrize("fault,expected", [("before", 1), ("items", 1), ("rename", 1),
                                            ("after", 2)])
def test_a_save_killed_anywhere_leaves_a_whole_step(step1, tmp_path, capfd, fault, expected):
  wd = str(tmp_path / "w")
  shutil.copytree(step1, wd)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _CHILD, wd, fault], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
  # killed at the fault point, not before it (an import error would be 1) nor after
  assert res.returncode == 17 and "saved, not killed" not in res.stdout, res.stderr[-3000:]
  assert _check_whole(wd, capfd) == expected
  # The resume's next save (the killed step again, or the one after it) goes
  # through, whatever the kill left behind.
  nxt = expected + 1
  with workdir.Run.open(wd, CFG, ST, dict(spec="tiny"), extra=dict(trained_by=f"save {nxt}"),
                        log=None) as run:
    assert run.step == expected
    run.save(_state(nxt), dict(marker=nxt))
  assert _check_whole(wd, capfd) == nxt


def test_the_child_saves_when_not_killed(step1, tmp_path, capfd):
  """The fault script without a fault (an unknown name) saves step 2: the kills
  above are what stops it."""
  wd = str(tmp_path / "w")
  shutil.copytree(step1, wd)
  res = subprocess.run([sys.executable, "-c", _CHILD, wd, "none"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       timeout=600)
  assert res.returncode == 0 and "saved, not killed" in res.stdout, res.stderr[-3000:]
  assert _check_whole(wd, capfd) == 2


def test_a_step_holds_state_settings_and_data_as_items(step1):
  names = set(os.listdir(os.path.join(step1, "checkpoints", "1")))
  assert {checkpoint.STATE_ITEM, checkpoint.SETTINGS_ITEM, checkpoint.DATA_ITEM} <= names
  assert not names & {checkpoint.SETTINGS_FILE, checkpoint.DATA_STATE_FILE}  # no side files


def _legacy_workdir(wd, step, side_files=True):
  """A workdir as the versions before composite steps wrote it: orbax's single
  item (`default/`) and, after its commit, scr_settings.json and
  data_state.json in the step folder; config.json + adjacency.json beside."""
  state = _state(step)
  opts = ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                      enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints")), options=opts)
  mngr.save(step, args=ocp.args.StandardSave(state.tree()), force=True)
  mngr.wait_until_finished()
  settings = dict(checkpoint.run_settings(CFG, ST, dict(spec="old")), step=step,
                  trained_by=f"save {step}")
  if side_files:
    sd = os.path.join(wd, "checkpoints", str(step))
    with open(os.path.join(sd, checkpoint.SETTINGS_FILE), "w") as fh:
      json.dump(settings, fh)
    with open(os.path.join(sd, checkpoint.DATA_STATE_FILE), "w") as fh:
      json.dump(dict(marker=step), fh)
  checkpoint.save_run_files(wd, settings)


def test_older_single_item_steps_restore_and_resume(tmp_path, capfd):
  wd = str(tmp_path / "old")
  _legacy_workdir(wd, 3)
  assert not os.path.isdir(os.path.join(wd, "checkpoints", "3", checkpoint.STATE_ITEM))
  assert _check_whole(wd, capfd) == 3
  # resumed by a run of the same settings: the next step is a composite one
  with workdir.Run.open(wd, CFG, ST, dict(spec="old"), extra=dict(trained_by="save 4"),
                        log=None) as run:
    assert run.step == 3 and run.saved[2] == "checkpoint"
    tree = run.restore(_state(0).tree())
    assert int(tree["step"]) == 3
    run.save(_state(4), dict(marker=4))
  assert _check_whole(wd, capfd) == 4
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4", checkpoint.STATE_ITEM))


def test_older_steps_without_side_files_use_config_json(tmp_path, capfd):
  wd = str(tmp_path / "older")
  _legacy_workdir(wd, 5, side_files=False)
  capfd.readouterr()
  r = workdir.restore(wd)
  assert r.step == 5 and "without its settings" in capfd.readouterr().err
  assert r.cfg == CFG and r.settings["data"] == {}
  assert workdir.Run.read(wd).data_state(5) is None  # batches restart from the step


def test_a_resume_with_other_settings_is_refused_once_opened(step1, tmp_path):
  from scr_jax.errors import UserError
  wd = str(tmp_path / "w")
  shutil.copytree(step1, wd)
  other = config.override(CFG, ["depth_prior=1.0"])
  with pytest.raises(UserError, match="depth_prior"):
    workdir.Run.open(wd, other, ST, dict(spec="tiny"))
  with pytest.raises(UserError, match="already holds checkpoints"):
    workdir.Run.open(wd, CFG, ST, resume=False)
  # the refusals released the lock and left the run as it was
  with workdir.Run.open(wd, other, ST, resume=False, restart=True, log=None) as run:
    assert run.step is None
  assert any(n.startswith("previous-") for n in os.listdir(wd))


def test_a_train_command_opens_its_workdir_once(tiny_synface, tmp_path, monkeypatch):
  """`runner.train_run` (what `run.py train` does), fresh and resumed: one
  orbax manager, one lock (with its one write probe) and one settings
  comparison call site (at opening, then with the data's content)."""
  from scr_jax import lock, runner
  calls = dict(manager=0, probe=0, check=0)

  def counting(name, fn):
    def wrapped(*a, **k):
      calls[name] += 1
      return fn(*a, **k)
    return wrapped
  monkeypatch.setattr(checkpoint, "manager", counting("manager", checkpoint.manager))
  monkeypatch.setattr(lock, "probe_writable", counting("probe", lock.probe_writable))
  monkeypatch.setattr(checkpoint, "check_resume", counting("check", checkpoint.check_resume))
  wd = str(tmp_path / "w")
  cfg = runner.make_config("test_tiny", ["eval_every=1000"], steps=2)
  res = runner.train_run(cfg, wd, tiny_synface, log=lambda m: None)
  assert res["step"] == 2
  assert calls == dict(manager=1, probe=1, check=2)  # fresh: nothing saved to compare with
  calls.update(manager=0, probe=0, check=0)
  res = runner.train_run(config.override(cfg, ["steps=3"]), wd, tiny_synface, log=lambda m: None)
  assert res["step"] == 3 and res["start_step"] == 2
  assert calls == dict(manager=1, probe=1, check=2)
  s = checkpoint.load_settings(wd, 3)
  assert s["step"] == 3 and s["data"]["hash"] and s["data"]["spec"] == os.path.abspath(tiny_synface)


def test_json_writer_is_atomic(tmp_path, monkeypatch):
  from scr_jax import jsonio
  p = str(tmp_path / "sub" / "a.json")
  jsonio.write_json(p, dict(a=1))  # the folder is made
  assert json.load(open(p)) == dict(a=1)
  with pytest.raises(TypeError):
    jsonio.write_json(p, dict(a=object()))  # not JSON-able: nothing written
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
  with pytest.raises(OSError):
    jsonio.write_json(p, dict(a=2))  # the rename fails: the temporary file is removed
  assert json.load(open(p)) == dict(a=1) and os.listdir(tmp_path / "sub") == ["a.json"]
  monkeypatch.undo()
  jsonio.write_text(p, "[3]")
  assert json.load(open(p)) == [3] and os.listdir(tmp_path / "sub") == ["a.json"]


def test_the_runs_manager_keeps_the_configs_checkpoints(step1, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(step1, wd)
  cfg = config.override(CFG, ["keep_checkpoints=1"])  # harmless: the resume goes ahead
  with workdir.Run.open(wd, cfg, ST, dict(spec="tiny"), log=None) as run:
    assert run.step == 1
    for step in (2, 3):
      run.save(_state(step))
  assert sorted(n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit()) == ["3"]
