"""Reliability (issue 6), fast cases: bad input, half-written checkpoints,
numerical faults, unwritable workdirs, cyclic structures. Each failure is one
`error: ...` line naming the file or field, with a non-zero exit and no
traceback. The slow cases (SIGKILL at random moments, several trials, through
the CLI in subprocesses) are in tests/test_faults.py."""
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fault_cases  # tests/fault_cases.py
from experiments import render_reference
from scr_jax import (checkpoint, config, data, losses, model, parallel, structure, train,
                     train_step, workdir)
from scr_jax.errors import NonFiniteError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]
S = 16
# One training config for the in-process fits and steps (one compiled step).
CFG = dataclasses.replace(config.get_config("test_tiny"), steps=4, ckpt_every=2,
                          eval_every=1000)


def _cli(*args, timeout=120):
  return subprocess.run(RUN + list(args), capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout)


def _assert_one_error(res, code, *needles):
  """Exit `code`, stderr exactly one line `error: ...` containing the needles."""
  lines = [x for x in res.stderr.splitlines() if x.strip()]
  assert res.returncode == code, (res.returncode, res.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Synface folder (24 train, 8 val at 16px) and its train split."""
  root = str(tmp_path_factory.mktemp("rel_synface"))
  data.export_synface(root, n_train=24, n_val=8, n_test=8, size=S, seed=3, verbose=False)
  return root, data.load_synface(root, "train", S)


# ----------------------------------------------------------------------------
# Data: bad folders through the CLI; nothing in the folder is touched
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", [make for _, make in fault_cases.BAD_DATA],
                         ids=[name for name, _ in fault_cases.BAD_DATA])
def test_bad_data_one_line_and_folder_untouched(tmp_path, case):
  root = str(tmp_path / "data")
  culprit, why = case(root, S)
  before = fault_cases.snapshot(root)
  wd = str(tmp_path / "wd")
  res = _cli("train", "--preset", "test_tiny", "--data", root, "--workdir", wd, "--steps", "1")
  line = _assert_one_error(res, 2, culprit, why)
  assert line.count("\n") == 0
  assert fault_cases.snapshot(root) == before  # nothing created, changed or removed
  assert not os.path.exists(os.path.join(wd, "config.json"))  # failed before training


def test_non_fatal_images_are_converted_with_one_note_each(tmp_path, capfd):
  """Grayscale, RGBA, palette, 16-bit and wrong-size images load (converted,
  centre-cropped, resized as README says); each kind gives one `note:` line
  naming the first file; other files in the folder are ignored, also noted."""
  root = str(tmp_path / "sf")
  notes = fault_cases.non_fatal_folder(root, S)
  before = fault_cases.snapshot(root)
  capfd.readouterr()
  got = data.load_synface(root, "train", S)
  err = capfd.readouterr().err.splitlines()
  assert got["images"].shape == (5, S, S, 3) and got["depth"].shape == (5, S, S)
  assert np.isfinite(got["images"]).all() and np.isfinite(got["depth"]).all()
  gray = got["images"][2]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  assert all(x.startswith("note: ") for x in err) and len(err) == 4, err
  joined = "\n".join(err)
  for _, needle in notes:
    assert needle in joined, (needle, joined)
  assert fault_cases.snapshot(root) == before


# ----------------------------------------------------------------------------
# Config / CLI: one line naming the field
# ----------------------------------------------------------------------------

def _structure_file(tmp_path, m):
  p = str(tmp_path / "structure.json")
  with open(p, "w") as fh:
    json.dump(dict(factors=["V", "D", "L", "A"], M=m), fh)
  return p


@pytest.mark.parametrize("args,needles", [
    (["--preset", "nope"], ["unknown preset 'nope'"]),
    (["--set", "no_such_key=1"], ["no_such_key", "unknown config field"]),
    (["--set", "lr=fast"], ["--set lr", "expected a number"]),
    (["--set", "steps=1.5"], ["--set steps", "expected an integer"]),
    (["--steps", "-3"], ["steps=-3", ">= 0"]),
    (["--steps", "many"], ["--steps", "invalid int value"]),
    (["--variant", "dense", "--order", "VDLX"], ["order='VDLX'", "permutation"]),
    (["--variant", "dense", "--order", "VDL"], ["order='VDL'", "permutation"]),
    (["--set", "on_nonfinite=ignore"], ["on_nonfinite='ignore'"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_config_one_line(tmp_path, args, needles):
  res = _cli("train", "--preset", "test_tiny", "--workdir", str(tmp_path / "wd"),
             "--data", str(tmp_path / "unused"), *args)
  _assert_one_error(res, 2, *needles)
  assert not os.path.exists(tmp_path / "wd" / "config.json")


@pytest.mark.parametrize("m,needle", [
    ([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], "cycle"),
    ([[0, 1, 0], [0, 0, 1], [0, 0, 0]], "shape (3, 3)"),
    ([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], "cycle"),  # self-loop
    ([[0, "x", 0, 0]] * 4, "matrix of numbers"),
])
def test_bad_structure_file_one_line(tmp_path, m, needle):
  p = _structure_file(tmp_path, m)
  res = _cli("train", "--preset", "test_tiny", "--workdir", str(tmp_path / "wd"),
             "--data", str(tmp_path / "unused"), "--variant", "generic", "--structure", p)
  _assert_one_error(res, 2, p, "M", needle)


def test_cyclic_structure_is_never_written(tmp_path):
  save = getattr(structure, "save_structure", None)
  if save is None:
    pytest.skip("structure.save_structure(path, order=None, m=None, ...) not there yet")
  p = str(tmp_path / "structure.json")
  cyc = np.zeros((4, 4), np.float32)
  cyc[0, 1] = cyc[1, 3] = cyc[3, 0] = 0.7
  with pytest.raises((UserError, ValueError)) as err:
    save(p, m=cyc)
  msg = str(err.value)
  assert ("cycle" in msg or "DAG" in msg) and p in msg and "\n" not in msg, msg
  assert not os.path.exists(p)
  save(p, m=structure.dense_matrix("DVAL"))  # a DAG is written and reads back
  good = open(p, "rb").read()
  np.testing.assert_array_equal(structure.load_structure(p)["M"], structure.dense_matrix("DVAL"))
  for bad in (cyc, np.eye(4, dtype=np.float32), np.zeros((3, 3), np.float32)):
    with pytest.raises((UserError, ValueError)):
      save(p, m=bad)
    assert open(p, "rb").read() == good  # the previous file is left as it was
  assert sorted(os.listdir(tmp_path)) == ["structure.json"]  # no temporary left behind


# ----------------------------------------------------------------------------
# Checkpoints: half-written steps are skipped, never loaded
# ----------------------------------------------------------------------------

def _toy_state(step, value):
  return dict(params=dict(w=jnp.full(6, value, jnp.float32)), step=jnp.asarray(step, jnp.int32))


def test_half_written_checkpoint_is_skipped(tmp_path, capfd):
  wd = str(tmp_path / "wd")
  mngr = checkpoint.manager(wd)
  for step in (2, 4):
    checkpoint.save(mngr, _toy_state(step, step))
  ck = os.path.join(wd, "checkpoints")
  like = _toy_state(0, 0.0)
  # 1. a save killed mid-way: orbax's temporary folder, with partial content
  shutil.copytree(os.path.join(ck, "4"), os.path.join(ck, "6.orbax-checkpoint-tmp"))
  os.remove(os.path.join(ck, "6.orbax-checkpoint-tmp", "commit_success.txt"))
  # 2. a step folder without its commit marker (copy cut short, no atomic rename)
  shutil.copytree(os.path.join(ck, "4"), os.path.join(ck, "8"))
  os.remove(os.path.join(ck, "8", "commit_success.txt"))
  # 3. an empty step folder
  os.makedirs(os.path.join(ck, "10"))
  capfd.readouterr()
  got = checkpoint.restore_latest(checkpoint.manager(wd), like)
  assert int(got["step"]) == 4 and float(got["params"]["w"][0]) == 4.0
  warns = [x for x in capfd.readouterr().err.splitlines() if x.startswith("warning: ")]
  assert len(warns) == 2 and "step 10" in warns[0] and "step 8" in warns[1], warns
  # set aside (nothing deleted), so the steps can be written again
  assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(wd, "checkpoints.incomplete"))) \
      == ["10", "8"]
  mngr = checkpoint.manager(wd)
  for step in (6, 8):
    checkpoint.save(mngr, _toy_state(step, step))
  got = checkpoint.restore_latest(checkpoint.manager(wd), like)
  assert int(got["step"]) == 8 and float(got["params"]["w"][0]) == 8.0


def test_checkpoint_write_failure_is_one_line_and_keeps_old_steps(tmp_path, monkeypatch):
  wd = str(tmp_path / "wd")
  mngr = checkpoint.manager(wd)
  checkpoint.save(mngr, _toy_state(2, 2.0))

  def full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(mngr, "save", full)
  with pytest.raises(UserError) as err:
    checkpoint.save(mngr, _toy_state(4, 4.0))
  msg = str(err.value)
  assert "step 4" in msg and "No space left" in msg and "step 2, intact" in msg and "\n" not in msg
  got = checkpoint.restore_latest(checkpoint.manager(wd), _toy_state(0, 0.0))
  assert int(got["step"]) == 2


# orbax's failed restore leaves callbacks for a closed event loop (collected here)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unrestorable_checkpoint_is_one_line(tmp_path):
  import gc
  wd = str(tmp_path / "wd")
  checkpoint.save(checkpoint.manager(wd), _toy_state(2, 2.0))
  wrong = dict(params=dict(w=jnp.zeros(7)), step=jnp.asarray(0, jnp.int32))
  with pytest.raises(UserError) as err:
    checkpoint.restore_latest(checkpoint.manager(wd), wrong)
  assert "step 2" in str(err.value) and "\n" not in str(err.value)
  del err
  gc.collect()


# ----------------------------------------------------------------------------
# Disk: unwritable workdir fails before training
# ----------------------------------------------------------------------------

def _unshare_ok():
  if not shutil.which("unshare"):
    return False
  r = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  return r.returncode == 0


def _in_namespace(mount, cmd):
  """Runs cmd (a list) in a private mount namespace after `mount` (a shell line)."""
  line = mount + " && exec " + " ".join(f"'{c}'" for c in cmd)
  return subprocess.run(["unshare", "-rm", "sh", "-c", line], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_unwritable_workdir_fails_before_training(tmp_path, tiny, kind):
  mnt = str(tmp_path / "mnt")
  os.makedirs(mnt)
  if kind == "read-only" and os.geteuid() != 0:
    os.chmod(mnt, 0o555)
    res = _cli("train", "--preset", "test_tiny", "--data", tiny[0], "--workdir", mnt + "/wd")
  else:
    if not _unshare_ok():
      pytest.skip("needs unshare (user + mount namespaces) to mount a small tmpfs")
    opts = "ro" if kind == "read-only" else "size=40k"
    res = _in_namespace(f"mount -t tmpfs -o {opts} tmpfs '{mnt}'",
                        RUN + ["train", "--preset", "test_tiny", "--data", tiny[0],
                               "--workdir", mnt + "/wd"])
  why = "Read-only file system" if kind == "read-only" and os.geteuid() == 0 else (
      "No space left" if kind == "full" else "ermission denied")
  _assert_one_error(res, 2, mnt + "/wd", "not writable", why)


def test_free_space_check(tmp_path, monkeypatch):
  state = _toy_state(0, 0.0)
  checkpoint.check_free_space(str(tmp_path), state, 3)  # plenty here
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
  with pytest.raises(UserError) as err:
    checkpoint.check_free_space(str(tmp_path), state, 3)
  assert str(tmp_path) in str(err.value) and "MiB free" in str(err.value)


def test_cli_disk_error_mid_run_is_one_line(monkeypatch, capsys):
  """ENOSPC / EROFS raised anywhere (logs, tensorboard) ends as one line, exit 2."""
  import errno
  from scr_jax import cli

  def full(args):
    raise OSError(errno.ENOSPC, "No space left on device", "/w/metrics.csv")
  monkeypatch.setattr(cli, "cmd_train", full)
  monkeypatch.setattr(sys, "stderr", sys.stderr)  # fail() silences stderr after its line
  with pytest.raises(SystemExit) as ex:
    cli.main(["train", "--workdir", "/w"])
  assert ex.value.code == 2
  assert capsys.readouterr().err == "error: /w/metrics.csv: No space left on device\n"


# ----------------------------------------------------------------------------
# Numerical faults
# ----------------------------------------------------------------------------

def _poisoned(tr, cfg, step):
  """Train images with NaN in exactly the batch of (0-based) `step`."""
  imgs = tr["images"].copy()
  imgs[train.batch_indices(imgs.shape[0], cfg.batch_size, cfg.seed, step)] = np.nan
  return dict(tr, images=imgs)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_nonfinite_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
  _, tr = tiny
  cfg = CFG
  bad = _poisoned(tr, cfg, 2)  # the third step sees NaN
  wd = str(tmp_path / "stop")
  with pytest.raises(NonFiniteError) as err:
    train.fit_workdir(cfg, wd, bad, quiet=True)
  msg = str(err.value)
  assert "step 3" in msg and "step 2" in msg and "\n" not in msg, msg
  _, like = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
  kept = checkpoint.restore_latest(checkpoint.manager(wd), like.tree())
  assert int(kept["step"]) == 2
  ref = train.fit_workdir(dataclasses.replace(cfg, steps=2), str(tmp_path / "ref2"), tr,
                        quiet=True)
  for a, b in zip(_leaves(kept["params"]), _leaves(ref["state"].params)):
    np.testing.assert_array_equal(a, b)  # the good state, bit for bit

  # on_nonfinite=skip: the bad batch leaves params and optimiser untouched
  skip = dataclasses.replace(cfg, steps=3, on_nonfinite="skip")
  res = train.fit_workdir(skip, str(tmp_path / "skip"), bad, quiet=True)
  assert res["step"] == 3
  for a, b in zip(_leaves(res["state"].params), _leaves(ref["state"].params)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(tmp_path, "skip", "metrics.csv")) as fh:
    assert "3,train/skipped_nonfinite,1" in fh.read()


def test_renderer_degenerate_inputs_finite_values_and_gradients():
  """All-background images through the whole model, and the renderer at the
  clamp limits of depth and the extremes of view, light and albedo."""
  cfg = CFG
  cam = model.camera(cfg)
  # 1. a training step (random init) on black, white and half-black images,
  # called as fit calls it (the same compiled step as the test above)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  imgs = np.zeros((cfg.batch_size, S, S, 3), np.float32)
  imgs[1], imgs[2, :, : S // 2] = 1.0, 1.0
  mesh = parallel.data_mesh()
  new, met = train_step.make_train_step(nets, cfg)(
      parallel.replicate(state, mesh), parallel.shard_batch(imgs, mesh),
      parallel.replicate(structure.Structure(m=jnp.zeros((4, 4), jnp.float32)), mesh))
  assert bool(met["finite"]) and np.isfinite(float(met["loss"]))
  assert np.isfinite(float(met["grad_norm"])) and float(met["grad_norm"]) > 0
  assert all(np.isfinite(x).all() for x in _leaves(new.params))
  # 2. the renderer with factors at their limits (what the heads can emit)
  rot = np.deg2rad(cfg.xyz_rotation_range)
  views = [np.zeros(6), [rot, rot, rot, 0.1, 0.1, 0], [-rot, -rot, -rot, -0.1, -0.1, 0],
           [0, rot, 0, 0.1, 0, 0]]
  f = render_reference.limit_factors(cam, views)
  n = f.depth_BxSxS.shape[0]
  target = jnp.zeros((n, S, S, 3))

  def objective(f):
    orig, flip = model.render_factors(f, cam)
    out = model.ForwardOutput(factors=f, orig=orig, flip=flip,
                              sigma_l1_BxSxSx2=jnp.full((n, S, S, 2), 0.0),
                              sigma_perc_BxTxTx2=None, input_BxSxSx3=model.to_model_range(target))
    loss, _ = losses.total_loss(out, dataclasses.replace(cfg, min_sigma=0.05))
    both = lambda k: jnp.concatenate([getattr(orig, k), getattr(flip, k)], 0)
    return loss + jnp.mean(both("recon_depth_BxSxS")) + jnp.mean(both("canon_normal_BxSxSx3"))

  val, g = jax.jit(jax.value_and_grad(objective))(f)
  assert np.isfinite(float(val))
  for k, x in zip(("depth", "albedo", "ambient", "diffuse", "light_dxy", "view"),
                  jax.tree_util.tree_leaves(g)):
    assert np.isfinite(np.asarray(x)).all(), k


# ----------------------------------------------------------------------------
# Issue 12, kinds 6 and 8: output paths and the JAX setup checked first, in
# one line each; CLI messages name CLI flags
# ----------------------------------------------------------------------------

def _bad_output_cases(tmp_path, data_root):
  """(argv, needles) per subcommand: each writes to a path it cannot use. The
  workdirs given as input do not exist, so a check made after loading a model
  or reading data would report them instead."""
  f = str(tmp_path / "a_file")
  fault_cases.write(f, b"x")
  folder = str(tmp_path / "a_folder")
  os.makedirs(folder, exist_ok=True)
  nowhere = str(tmp_path / "no_workdir")
  return [
      (["data", "--out", f, "--n-train", "2", "--size", "16"], ["--out", f, "is a file"]),
      (["train", "--preset", "test_tiny", "--data", data_root, "--workdir", f],
       ["--workdir", f, "is a file"]),
      (["eval", "--workdir", nowhere, "--data", data_root, "--out", folder],
       ["--out", folder, "is a folder"]),
      (["eval", "--workdir", nowhere, "--data", data_root, "--save-predictions",
        os.path.join(f, "pred.npz")], ["--save-predictions", f + " is a file"]),
      (["eval", "--workdir", nowhere, "--data", data_root, "--save-predictions",
        str(tmp_path / "pred.npy")], ["--save-predictions", "ending in .npz"]),
      (["predict", "--workdir", nowhere, "--images", data_root, "--out", f],
       ["--out", f, "is a file"]),
      (["search", "--method", "unroll", "--preset", "test_tiny", "--data", data_root,
        "--workdir", f], ["--workdir", f, "is a file"]),
      (["reproduce", "--preset", "test_tiny", "--out", f], ["--out", f, "is a file"]),
      (["main", "--workdir", os.path.join(f, "sub")], ["--workdir", f + " is a file"]),
  ]


def test_bad_output_paths_one_line_before_any_work(tmp_path, tiny):
  for argv, needles in _bad_output_cases(tmp_path, tiny[0]):
    res = _cli(*argv)
    assert "Traceback" not in res.stderr, (argv, res.stderr[-3000:])
    _assert_one_error(res, 2, *needles)


@pytest.mark.parametrize("platform,needles", [
    ("cuda", ["JAX_PLATFORMS='cuda'", "jax[cuda12]", "JAX_PLATFORMS=cpu"]),
    ("tpu", ["JAX_PLATFORMS='tpu'", "jax[tpu]"]),
    ("nosuchdevice", ["JAX_PLATFORMS='nosuchdevice'", "JAX_PLATFORMS=cpu"]),
])
def test_bad_jax_platform_one_line(tmp_path, tiny, platform, needles):
  """JAX_PLATFORMS naming a backend this install lacks: every JAX command ends
  with one line saying what to install or set (jax itself raises a bare
  AssertionError for cuda on a CPU-only jaxlib)."""
  env = dict(os.environ, JAX_PLATFORMS=platform)
  root = tiny[0]
  wd = str(tmp_path / "wd")
  cmds = [["train", "--preset", "test_tiny", "--data", root, "--workdir", wd],
          ["eval", "--workdir", wd, "--data", root],
          ["predict", "--workdir", wd, "--images", root, "--out", str(tmp_path / "p")],
          ["search", "--method", "bo", "--preset", "test_tiny", "--data", root,
           "--workdir", str(tmp_path / "s")],
          ["reproduce", "--preset", "test_tiny", "--out", str(tmp_path / "r")],
          ["main", "--workdir", str(tmp_path / "m")]]
  if platform != "cuda":
    cmds = cmds[:2]  # the same check for all; two are enough for the other platforms
  for argv in cmds:
    res = subprocess.run(RUN + argv, capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert "Traceback" not in res.stderr, (argv, res.stderr[-3000:])
    _assert_one_error(res, 2, *needles)
  assert not os.path.exists(wd)  # refused before the workdir was made


def test_train_data_that_is_a_file_says_so(tmp_path):
  f = fault_cases.write(str(tmp_path / "faces.png"), fault_cases.png((S, S, 3)))
  res = _cli("train", "--preset", "test_tiny", "--data", f, "--workdir", str(tmp_path / "wd"))
  line = _assert_one_error(res, 2, f, "is a file, not a folder")
  assert "folder not found" not in line


def test_data_out_refusal_names_the_cli_flag(tmp_path):
  out = str(tmp_path / "d")
  args = ["data", "--out", out, "--n-train", "2", "--n-val", "0", "--n-test", "0",
          "--size", "16"]
  res = _cli(*args)
  assert res.returncode == 0, res.stderr
  before = fault_cases.snapshot(out)
  line = _assert_one_error(_cli(*args), 2, out, "--overwrite")
  assert "overwrite=True" not in line
  assert fault_cases.snapshot(out) == before
  assert _cli(*args, "--overwrite").returncode == 0


def test_search_flags_checked_with_their_cli_names(tmp_path, tiny):
  cases = [(["--evals", "2", "--init", "4"], ["--evals", "--init (4)"]),
           (["--batch", "0"], ["--batch"]),
           (["--method", "unroll", "--inner", "rmsprop"], ["--inner", "invalid choice"])]
  for extra, needles in cases:
    argv = ["search", "--preset", "test_tiny", "--data", tiny[0], "--workdir",
            str(tmp_path / "s")]
    if "--method" not in extra:
      argv += ["--method", "bo"]
    line = _assert_one_error(_cli(*argv, *extra), 2, *needles)
    assert "n_evals" not in line and "n_init" not in line


def test_distributed_without_a_cluster_is_one_line(tmp_path, tiny):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_"))}
  wd = str(tmp_path / "wd")
  res = subprocess.run(RUN + ["train", "--preset", "test_tiny", "--data", tiny[0], "--workdir",
                              wd, "--distributed"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
  assert "Traceback" not in res.stderr
  _assert_one_error(res, 2, "--distributed", "jax.distributed.initialize() failed", "SLURM")
  assert not os.path.exists(wd)


# ----------------------------------------------------------------------------
# Issue 23: workdirs across machines and jobs, split folder names, batch size
# over devices, JSON written by Windows editors
# ----------------------------------------------------------------------------

TWO_DEVICES = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _cli_in_process(capfd, *argv):
  """run.py in this process: (exit code, stderr lines)."""
  from scr_jax import cli
  capfd.readouterr()
  code, stderr = 0, sys.stderr
  try:
    cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  finally:
    sys.stderr = stderr  # cliutil.fail silences stderr after its one line
  return code, [x for x in capfd.readouterr().err.splitlines() if x.strip()]


def test_workdir_trained_on_two_devices_is_used_on_one(tmp_path, tiny, capfd):
  """Kind 1: a single-structure and a candidates workdir trained on 2 devices
  (the candidates sharded over them) are evaluated, predicted on and resumed
  here, on 1 device: the checkpoint is restored onto this machine's devices."""
  root = tiny[0]
  wd, wdk = str(tmp_path / "wd2"), str(tmp_path / "wdk2")
  script = ("import sys\nfrom scr_jax import cli\n"
            "a = ['train', '--preset', 'test_tiny', '--data', sys.argv[1], '--steps', '2']\n"
            "cli.main(a + ['--workdir', sys.argv[2]])\n"
            "cli.main(a + ['--workdir', sys.argv[3], '--candidates', 'DVAL,LADV'])\n"
            "import jax; print('devices', len(jax.devices()))\n")
  res = subprocess.run([sys.executable, "-c", script, root, wd, wdk], capture_output=True,
                       text=True, cwd=ROOT, env=TWO_DEVICES, timeout=600)
  assert res.returncode == 0 and "devices 2" in res.stdout, res.stderr[-3000:]
  assert len(jax.devices()) == 1
  img = sorted(glob.glob(os.path.join(root, "test", "image", "*.png")))[0]
  for w, extra in ((wd, []), (wdk, ["--candidate", "LADV"])):
    code, err = _cli_in_process(capfd, "eval", "--workdir", w, "--data", root, "--out",
                                str(tmp_path / "e.json"))
    assert code in (0, None), err
    assert not any("Topology" in x or x.startswith("error") for x in err), err
    code, err = _cli_in_process(capfd, "predict", "--workdir", w, "--images", img, "--out",
                                str(tmp_path / ("p" + os.path.basename(w))), "--video-size",
                                "16", *extra)
    assert code in (0, None), err
  # training resumes it here too (one more step, one device)
  code, err = _cli_in_process(capfd, "train", "--preset", "test_tiny", "--data", root,
                              "--workdir", wd, "--steps", "3")
  assert code in (0, None), err
  assert workdir.Run.read(wd).step == 3


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "test_tiny", "--set", "batch_size=3"],
    ["search", "--method", "unroll", "--preset", "test_tiny", "--set", "batch_size=5"],
])
def test_batch_size_not_dividing_over_devices_is_one_line(tmp_path, tiny, argv):
  """Kind 6: a batch that does not split evenly over 2 devices: one line
  naming both numbers and a fitting size, before any data or workdir file."""
  wd = str(tmp_path / "wd")
  res = subprocess.run(RUN + argv + ["--data", tiny[0], "--workdir", wd], capture_output=True,
                       text=True, cwd=ROOT, env=TWO_DEVICES, timeout=300)
  n = argv[-1].split("=")[1]
  _assert_one_error(res, 2, f"batch_size {n} does not divide over the 2 devices",
                    "multiple of 2")
  assert "Traceback" not in res.stderr
  assert not os.path.exists(os.path.join(wd, "config.json"))
  parallel.check_batch_size(3)  # one device here: any batch fits


def test_second_training_in_a_workdir_in_use_is_refused(tmp_path, tiny):
  """Kind 2: a second `train` on a workdir another training is using exits 2
  with one line naming the holder's pid and host, before touching anything;
  the first run goes on, and on SIGTERM saves, exits and releases the lock:
  metrics.csv has each step once, one event file."""
  import signal
  import socket
  import time
  wd = str(tmp_path / "wd")
  args = ["train", "--preset", "test_tiny", "--data", tiny[0], "--workdir", wd, "--set",
          "eval_every=100000", "--set", "ckpt_every=50"]
  first = subprocess.Popen(RUN + args + ["--steps", "100000"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    csv_path = os.path.join(wd, "metrics.csv")
    t0 = time.time()
    while not os.path.exists(csv_path) and first.poll() is None and time.time() - t0 < 300:
      time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-3000:]
    res = _cli("train", "--preset", "test_tiny", "--data", tiny[0], "--workdir", wd, "--seed", "7",
               "--steps", "100000")
    _assert_one_error(res, 2, wd, "in use", f"pid {first.pid}", socket.gethostname())
    assert first.poll() is None  # the first run goes on
    holder = json.load(open(os.path.join(wd, "workdir.lock")))
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
  finally:
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
  assert first.returncode == 143, err[-3000:]
  assert not os.path.exists(os.path.join(wd, "workdir.lock"))
  with open(os.path.join(wd, "metrics.csv")) as fh:
    rows = [r.split(",")[:2] for r in fh.read().splitlines()[1:]]
  assert len(rows) == len({tuple(r) for r in rows})  # each (step, key) once
  assert len(os.listdir(os.path.join(wd, "tb"))) == 1


def test_lock_stale_and_foreign_holders(tmp_path):
  """Kind 2: a lock of a killed process on this host is taken over with a
  note; one from another host is refused naming it, with how to override;
  the lock is re-entrant in a process and released on exceptions."""
  import signal
  import socket
  from scr_jax import lock
  wd = str(tmp_path / "wd")
  holder = subprocess.Popen([sys.executable, "-c",
                             "import sys, time\nfrom scr_jax import lock\n"
                             "with lock.hold(sys.argv[1]):\n  print('held', flush=True)\n"
                             "  time.sleep(300)\n", wd], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError) as err:  # held: refused, naming it
      with lock.hold(wd):
        pass
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(err.value)
  finally:
    holder.send_signal(signal.SIGKILL)  # dies without releasing: a stale lock file
    holder.wait()
  assert lock.read_holder(wd)["pid"] == holder.pid
  notes = []
  with lock.hold(wd, log=notes.append):
    assert lock.read_holder(wd)["pid"] == os.getpid()
    with lock.hold(wd):  # re-entrant
      pass
    assert os.path.exists(lock.lock_path(wd))
    import threading
    errs = []

    def other_thread():
      try:
        with lock.hold(wd):
          pass
      except UserError as e:
        errs.append(str(e))
    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errs) == 1 and "another thread" in errs[0]
  assert len(notes) == 1 and "stale lock" in notes[0] and str(holder.pid) in notes[0]
  assert not os.path.exists(lock.lock_path(wd))
  # another machine's lock on a shared folder: its flock may not be visible here
  with open(lock.lock_path(wd), "w") as fh:
    json.dump(dict(pid=4242, host="other-machine", started="2024-01-01T00:00:00+00:00"), fh)
  with pytest.raises(UserError) as err:
    with lock.hold(wd):
      pass
  msg = str(err.value)
  assert "pid 4242 on host other-machine" in msg and "delete " + lock.lock_path(wd) in msg
  assert "\n" not in msg
  os.remove(lock.lock_path(wd))
  with pytest.raises(RuntimeError):
    with lock.hold(wd):
      raise RuntimeError("boom")
  assert not os.path.exists(lock.lock_path(wd))


def _split_tree(root, names, n=(3, 2, 2)):
  """Image folders root/<name>/ with n[i] images each (distinct contents)."""
  k = 0
  for name, count in zip(names, n):
    for i in range(count):
      rng = np.random.default_rng(k)
      k += 1
      fault_cases.write(os.path.join(root, name, f"{i:03d}.png"),
                        _png_bytes(rng.integers(0, 255, (S, S, 3), dtype=np.uint8)))
  return root


def _png_bytes(a):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="png")
  return buf.getvalue()


@pytest.mark.parametrize("names", [
    ("training", "validation", "testing"), ("Train", "Val", "Test"),
    ("train", "valid", "test"), ("train_set", "dev_set", "test_set"),
    ("TrainImages", "ValidationImages", "TestImages"), ("train", "validation", "test"),
])
def test_split_folders_under_usual_names(tmp_path, names):
  """Kind 3: split folders named other than exactly train/val/test are read as
  their splits (never merged into training), by prepare and by the in-memory
  reader, and --split takes the usual names too."""
  from scr_jax import dataset, prepare
  root = _split_tree(str(tmp_path / "faces"), names)
  scan = prepare.scan(root)
  assert {s: len(v) for s, v in scan["splits"].items()} == dict(train=3, val=2, test=2)
  assert all(os.sep + names[0] + os.sep in p for _, p, _ in scan["splits"]["train"])
  cfg = config.get_config("test_tiny")
  d, _ = dataset._read_folder(root, "val", cfg, need_depth=False)
  assert len(d["images"]) == 2
  d, _ = dataset._read_folder(root, "train", cfg, need_depth=False)
  assert len(d["images"]) == 3
  got = dataset.load_split(root, "validation", cfg, need_depth=False, with_gt=False,
                           cache=str(tmp_path / "cache"))
  assert len(got["images"]) == 2


@pytest.mark.parametrize("layout,needles", [
    (dict(names=("faces", "faces/celeba/test"), n=(3, 2)), ["faces/celeba/test", "test split"]),
    (dict(names=("a", "a/Validation_Set"), n=(3, 2)), ["Validation_Set", "val split"]),
    (dict(names=("holdout",), n=(2,)), ["holdout", "held-out"]),
    (dict(names=("val", "validation", "train"), n=(1, 1, 2)), ["val/", "validation/", "keep one"]),
    (dict(names=("validation", "test"), n=(2, 2)), ["validation/", "test/", "none for training"]),
    (dict(names=("trainval", "test"), n=(2, 2)), ["trainval", "train and val"]),
    (dict(names=("train", "train/test_hard"), n=(2, 2)), ["test_hard", "test split"]),
])
def test_held_out_folders_are_never_trained_on(tmp_path, layout, needles):
  """Kind 3: a folder named as a test / validation split inside the training
  images, two folders for one split, split folders without a training one, a
  folder joining splits: `train` refuses in one line naming the folders,
  before anything is prepared or written."""
  root = _split_tree(str(tmp_path / "data"), layout["names"], layout["n"])
  before = fault_cases.snapshot(root)
  wd = str(tmp_path / "wd")
  res = _cli("train", "--preset", "test_tiny", "--data", root, "--workdir", wd, "--steps", "1")
  _assert_one_error(res, 2, *needles)
  assert fault_cases.snapshot(root) == before
  assert not os.path.exists(os.path.join(wd, "config.json"))
  assert not glob.glob(os.path.join(root + ".prepared", "*", "manifest.json"))


def test_json_with_a_byte_order_mark_is_read(tmp_path):
  """structure.json (and the workdir's config.json) saved by Windows Notepad
  start with a UTF-8 BOM: read as JSON."""
  p = str(tmp_path / "structure.json")
  with open(p, "w", encoding="utf-8-sig") as fh:
    json.dump(dict(factors=["V", "D", "L", "A"], order="DVAL"), fh)
  assert open(p, "rb").read(3) == b"\xef\xbb\xbf"
  assert structure.load_structure(p)["order"] == "DVAL"
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  with open(os.path.join(wd, "config.json"), "w", encoding="utf-8-sig") as fh:
    fh.write(config.get_config("test_tiny").to_json())
  assert checkpoint.load_config(wd).preset == "test_tiny"
  assert config.Config.from_json("\ufeff" + config.get_config("test_tiny").to_json()).steps == 4
