#!/usr/bin/env python
"""Fault injection through the CLI (issue 6): bad input, interrupted runs,
numerical faults, unwritable workdirs. Every case runs the real CLI
(`experiments/run.py`) in a subprocess, except the renderer and structure
checks (in-process). The fast in-process cases are tests/test_reliability.py.

As tests (the CLI cases are marked `slow`, which `make test` leaves out):

  python -m pytest -q -m slow tests/test_faults.py     (2 SIGKILL trials)

As a report (the table README quotes; the repo root on the path for
`experiments.render_reference`):

  PYTHONPATH=. python tests/test_faults.py [--quick] [--trials 5] [--seed 0] [--keep]

prints a markdown table `case | expected | outcome | ok`, then one JSON line
(the last line): {"cases": N, "ok": M, ...}. Disk cases mount a small tmpfs in
a private mount namespace (`unshare -rm`); without it they are skipped.
"""
import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fault_cases  # noqa: E402  (tests/fault_cases.py, beside this file)
from experiments import render_reference  # noqa: E402
from scr_jax import config, losses, model, structure, workdir  # noqa: E402
from scr_jax.errors import UserError  # noqa: E402

RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]
S = 16
STEPS, CKPT = 12, 3  # the interrupted-training runs: 12 steps, a checkpoint every 3
TRAIN = ["train", "--preset", "test_tiny", "--set", "eval_every=1000", "--set", "log_every=1"]

ROWS = []  # (case, expected, outcome, ok: True / False / None = skipped)


def row(case, expected, outcome, ok):
  ROWS.append((case, expected, outcome, ok))
  mark = {True: "ok", False: "FAIL", None: "skip"}[ok]
  print(f"[{mark}] {case}: {outcome}", file=sys.stderr, flush=True)


def cli(*args, timeout=300):
  return subprocess.run(RUN + list(args), capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout)


def errors(res):
  """(error lines, whether stderr holds a traceback)."""
  lines = [x for x in res.stderr.splitlines() if x.strip()]
  return [x for x in lines if x.startswith("error: ")], "Traceback" in res.stderr


def one_error(res, code, needles):
  """Outcome text and ok for: exit `code`, stderr exactly one `error:` line
  containing every needle, no traceback."""
  lines = [x for x in res.stderr.splitlines() if x.strip()]
  errs, tb = errors(res)
  ok = (res.returncode == code and len(lines) == 1 and len(errs) == 1 and not tb
        and all(n in errs[0] for n in needles))
  shown = errs[0] if errs else (lines[-1] if lines else "(no stderr)")
  extra = "" if len(lines) <= 1 else f" (+{len(lines) - 1} other stderr lines)"
  return f"exit {res.returncode}: `{shown[:150]}`{extra}", ok


def rel(p, base):
  return os.path.relpath(p, base)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def data_cases(base):
  for name, make in fault_cases.BAD_DATA:
    root = os.path.join(base, "data_" + make.__name__)
    culprit, why = make(root, S)
    before = fault_cases.snapshot(root)
    res = cli(*TRAIN, "--data", root, "--workdir", os.path.join(base, "wd_" + make.__name__),
              "--steps", "1")
    out, ok = one_error(res, 2, [culprit, why])
    untouched = fault_cases.snapshot(root) == before
    row(f"data: {name}", "exit 2, one line naming the file; folder untouched",
        out.replace(base + "/", "") + ("" if untouched else "; FOLDER CHANGED"), ok and untouched)


def data_non_fatal(base):
  """One folder holding all non-fatal oddities; one training step; one row each."""
  root = os.path.join(base, "data_nonfatal")
  cases = fault_cases.non_fatal_folder(root, S)
  before = fault_cases.snapshot(root)
  res = cli(*TRAIN, "--data", root, "--workdir", os.path.join(base, "wd_nonfatal"), "--steps", "1")
  notes = [x for x in res.stderr.splitlines() if x.startswith("note: ")]
  untouched = fault_cases.snapshot(root) == before
  trained = res.returncode == 0 and "trained to step 1" in res.stderr
  for name, needle in cases:
    hit = [x for x in notes if needle in x]
    out = (f"exit {res.returncode}, trained; `{rel(hit[0][6:], root)[:110]}`" if hit and trained
           else f"exit {res.returncode}; notes: {notes}; {res.stderr[-300:]}")
    row(f"data: {name}", "loads (converted / resized / ignored as documented), one note line",
        out, bool(hit) and trained and untouched)


# ----------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------

def config_cases(base):
  cyc = os.path.join(base, "cycle.json")
  with open(cyc, "w") as fh:
    json.dump(dict(M=[[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]), fh)
  shape = os.path.join(base, "shape.json")
  with open(shape, "w") as fh:
    json.dump(dict(M=[[0, 1], [0, 0]]), fh)
  cases = [
      ("unknown preset", ["--preset", "tiny"], ["unknown preset 'tiny'"]),
      ("unknown --set key", ["--set", "learning_rate=1e-3"],
       ["learning_rate", "unknown config field"]),
      ("wrong type", ["--set", "batch_size=four"], ["batch_size", "expected an integer"]),
      ("negative steps", ["--steps", "-5"], ["steps=-5"]),
      ("non-integer --steps", ["--steps", "ten"], ["--steps", "invalid int"]),
      ("ordering not a permutation of VDLA", ["--variant", "dense", "--order", "VDLL"],
       ["order='VDLL'", "permutation"]),
      ("structure M with a cycle", ["--variant", "generic", "--structure", cyc],
       [cyc, "M", "cycle"]),
      ("structure M of the wrong shape", ["--variant", "generic", "--structure", shape],
       [shape, "M", "4x4"]),
  ]
  for name, args, needles in cases:
    wd = os.path.join(base, "wd_cfg")
    res = cli(*TRAIN, "--data", os.path.join(base, "data_missing"), "--workdir", wd, *args)
    out, ok = one_error(res, 2, needles)
    ok = ok and not os.path.exists(os.path.join(wd, "config.json"))
    row(f"config: {name}", "exit 2, one line naming the field", out.replace(base + "/", ""), ok)


def structure_case(base):
  save = getattr(structure, "save_structure", None)
  case = "structure: cyclic M is never written"
  if save is None:
    row(case, "refused, no file written", "structure.save_structure not there yet", None)
    return
  p = os.path.join(base, "saved_structure.json")
  cyc = np.zeros((4, 4), np.float32)
  cyc[0, 1] = cyc[1, 2] = cyc[2, 0] = 0.5
  try:
    save(p, m=cyc)
    row(case, "refused, no file written", "written without an error", False)
  except (UserError, ValueError) as e:
    row(case, "refused, no file written",
        f"`{str(e)[:120]}`; file exists: {os.path.exists(p)}".replace(base + "/", ""),
        not os.path.exists(p) and "\n" not in str(e))


# ----------------------------------------------------------------------------
# Interrupted training
# ----------------------------------------------------------------------------

def _params(wd):
  """(step, parameter leaves) of the workdir's newest checkpoint, read back
  the way eval and predict read it (workdir.restore)."""
  r = workdir.restore(wd)
  return r.step, [np.asarray(x) for x in jax.tree_util.tree_leaves(r.params)]


def _same(a, b):
  return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=False)
                                  for x, y in zip(a, b))


def _logged_step(wd):
  try:
    with open(os.path.join(wd, "metrics.csv")) as fh:
      steps = [int(x.split(",")[0]) for x in fh.read().splitlines()[1:] if x.strip()]
    return max(steps, default=0)
  except (OSError, ValueError):
    return 0


def _train_args(data_dir, wd, steps=STEPS):
  return [*TRAIN, "--data", data_dir, "--workdir", wd, "--steps", str(steps),
          "--set", f"ckpt_every={CKPT}"]


def kill_trials(base, data_dir, ref, trials, seed):
  rng = np.random.default_rng(seed)
  for k in range(trials):
    wd = os.path.join(base, f"wd_kill{k}")
    mode = "startup" if k == 0 else ("save" if k == 1 else "step")
    target = int(rng.integers(1, STEPS - 1))
    proc = subprocess.Popen(RUN + _train_args(data_dir, wd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    ck = os.path.join(wd, "checkpoints")
    t0, caught_tmp = time.time(), False
    if mode == "startup":  # during imports / data loading / compilation
      time.sleep(float(rng.uniform(1.0, 4.0)))
    elif mode == "save":  # the moment a checkpoint folder is being written
      while proc.poll() is None and time.time() - t0 < 240:
        if os.path.isdir(ck) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ck)):
          caught_tmp = True
          break
        time.sleep(0.002)
    else:  # at a random step, a random fraction of a step later
      while proc.poll() is None and time.time() - t0 < 240 and _logged_step(wd) < target:
        time.sleep(0.01)
      time.sleep(float(rng.uniform(0.0, 0.3)))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _logged_step(wd)
    tmp_left = os.path.isdir(ck) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ck))
    res = cli(*_train_args(data_dir, wd))
    start = 0
    for line in (res.stdout + res.stderr).splitlines():
      if line.startswith("resuming "):
        start = int(line.rsplit(" ", 1)[1])
    recomputed = done - start
    try:
      step, params = _params(wd)
      same = step == STEPS and _same(params, ref)
    except Exception as e:  # noqa: BLE001 (reported in the table)
      step, same = f"restore failed: {e}", False
    where = {"startup": "during startup", "step": f"after logged step {done}",
             "save": f"during the save after step {done}"
                     + ("" if caught_tmp else " (missed)")}[mode]
    out = (f"killed {where}{', tmp dir left' if tmp_left else ''}; resumed from {start}, "
           f"recomputed {recomputed}; exit {res.returncode}; final step {step}; "
           f"params {'bit-identical' if same else 'DIFFER'}")
    ok = (not finished and res.returncode == 0 and 0 <= recomputed <= CKPT and same
          and (mode != "save" or caught_tmp))
    row(f"SIGKILL trial {k + 1} ({mode})",
        f"completes, <= {CKPT} steps recomputed, params = uninterrupted", out, ok)


def half_written_case(base, data_dir, ref_wd, ref):
  """A finished run whose last step lost its commit marker, plus a stale tmp
  folder: the rerun warns, sets the step aside, resumes and matches."""
  wd = os.path.join(base, "wd_half")
  shutil.copytree(ref_wd, wd)
  ck = os.path.join(wd, "checkpoints")
  last = str(max(int(n) for n in os.listdir(ck) if n.isdigit()))
  os.remove(os.path.join(ck, last, "commit_success.txt"))
  shutil.copytree(os.path.join(ck, last), os.path.join(ck, f"{STEPS + CKPT}.orbax-checkpoint-tmp"))
  res = cli(*_train_args(data_dir, wd))
  warns = [x for x in res.stderr.splitlines() if x.startswith("warning: ")]
  resumed = [x for x in res.stdout.splitlines() if x.startswith("resuming ")]
  step, params = _params(wd)
  same = step == STEPS and _same(params, ref)
  aside = os.listdir(os.path.join(wd, "checkpoints.incomplete"))
  ok = (res.returncode == 0 and len(warns) == 1 and f"step {last}" in warns[0] and same
        and resumed and resumed[0].endswith(str(int(last) - CKPT)))
  row("checkpoint: half-written latest step", "skipped with one warning, never loaded",
      f"{len(warns)} warning; {resumed[0].split(' from ')[-1] if resumed else 'no resume'} -> "
      f"step {step}, params {'bit-identical' if same else 'DIFFER'}; set aside: {aside}", ok)


# ----------------------------------------------------------------------------
# Numerical faults
# ----------------------------------------------------------------------------

def nonfinite_cases(base, data_dir):
  wd = os.path.join(base, "wd_nan")
  # lr 1e30: step 1 is finite (params jump to ~1e30), step 2's loss is not.
  args = [*TRAIN, "--data", data_dir, "--workdir", wd, "--steps", "6", "--set", "lr=1e30",
          "--set", "ckpt_every=1"]
  res = cli(*args)
  errs, tb = errors(res)
  kept, finite = None, False
  try:
    kept, params = _params(wd)
    finite = all(np.isfinite(x).all() for x in params)
  except Exception:  # noqa: BLE001
    pass
  ok = (res.returncode == 3 and len(errs) == 1 and not tb and "step 2" in errs[0]
        and kept == 1 and finite)
  row("numeric: NaN/Inf loss (lr 1e30), on_nonfinite=stop",
      "exit 3, one line naming the step; last good checkpoint kept",
      f"exit {res.returncode}: `{errs[0][:110] if errs else res.stderr[-200:]}`; "
      f"restorable step {kept}, finite {finite}", ok)
  wd2 = os.path.join(base, "wd_skip")
  res = cli(*args[:-4], "--workdir", wd2, "--set", "lr=1e30", "--set", "on_nonfinite=skip")
  skipped = 0
  if os.path.exists(os.path.join(wd2, "metrics.csv")):
    with open(os.path.join(wd2, "metrics.csv")) as fh:
      skipped = sum("skipped_nonfinite" in x for x in fh)
  try:
    step, params = _params(wd2)
    finite = all(np.isfinite(x).all() for x in params)
  except Exception:  # noqa: BLE001
    step, finite = None, False
  row("numeric: same with on_nonfinite=skip", "completes, bad batches skipped, params finite",
      f"exit {res.returncode}; {skipped} steps skipped; final step {step}, finite {finite}",
      res.returncode == 0 and skipped == 5 and step == 6 and finite)


def renderer_case():
  cfg = dataclasses.replace(config.get_config("test_tiny"), min_sigma=0.05)
  cam = model.camera(cfg)
  rot = np.deg2rad(cfg.xyz_rotation_range)
  views = [np.zeros(6), [rot, rot, rot, 0.1, 0.1, 0], [-rot, -rot, -rot, -0.1, -0.1, 0]]
  f = render_reference.limit_factors(cam, views)
  n = f.depth_BxSxS.shape[0]

  def objective(f, target):
    orig, flip = model.render_factors(f, cam)
    out = model.ForwardOutput(factors=f, orig=orig, flip=flip,
                              sigma_l1_BxSxSx2=jnp.zeros((n, S, S, 2)),
                              sigma_perc_BxTxTx2=None, input_BxSxSx3=model.to_model_range(target))
    return (losses.total_loss(out, cfg)[0] + jnp.mean(orig.recon_depth_BxSxS)
            + jnp.mean(flip.recon_depth_BxSxS))

  bad, fn = 0, jax.jit(jax.value_and_grad(objective))
  for target in (jnp.zeros((n, S, S, 3)), jnp.ones((n, S, S, 3))):  # all background / all white
    val, g = fn(f, target)
    bad += int(not np.isfinite(float(val)))
    bad += sum(int(not np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(g))
  row("numeric: renderer at depth clamp limits, +-60 deg views, black/white targets",
      "finite values and gradients", f"{2 * n} renders, {bad} non-finite outputs", bad == 0)


# ----------------------------------------------------------------------------
# Disk
# ----------------------------------------------------------------------------

def _unshare_ok():
  return bool(shutil.which("unshare")) and subprocess.run(
      ["unshare", "-rm", "true"], capture_output=True).returncode == 0


def disk_cases(base, data_dir):
  names = [("read-only workdir", "ro", ["Read-only file system"]),
           ("full disk (40 KiB tmpfs)", "size=40k", ["No space left"]),
           ("nearly full disk (2.5 MiB: room for 2 checkpoints)", "size=2560k", ["MiB free"])]
  if not _unshare_ok():
    for name, _, _ in names:
      row(f"disk: {name}", "one line before training", "unshare -rm not available", None)
    return
  for name, opts, needles in names:
    mnt = os.path.join(base, f"mnt_{opts.replace('=', '')}")
    os.makedirs(mnt)
    wd, listing = os.path.join(mnt, "wd"), mnt + ".ls"
    cmd = " ".join(f"'{c}'" for c in RUN + _train_args(data_dir, wd))
    res = subprocess.run(["unshare", "-rm", "sh", "-c",
                          f"mount -t tmpfs -o {opts} tmpfs '{mnt}' && {cmd}; rc=$?; "
                          f"ls '{wd}/checkpoints' > '{listing}' 2>/dev/null; exit $rc"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    with open(listing) as fh:
      left = " ".join(fh.read().split())
    errs, tb = errors(res)
    before = not any(x.startswith("step ") for x in res.stderr.splitlines())  # no step ran
    ok = res.returncode == 2 and len(errs) == 1 and not tb and before and all(
        n in errs[0] for n in needles)
    out = (f"exit {res.returncode}: `{errs[0][:120] if errs else res.stderr[-150:]}`; "
           f"{'before' if before else 'AFTER'} the first step")
    if not before:
      out += f"; checkpoints left: {left or 'none'}"
    row(f"disk: {name}", "exit 2, one line before training starts", out.replace(base + "/", ""), ok)


def disk_fill_midrun(base, data_dir, ref):
  """The disk fills up (another process) after the first checkpoint: one
  line, the last complete checkpoint intact; after freeing space the rerun
  resumes and ends with the reference params."""
  case = "disk: fills up during training, then freed and rerun"
  if not _unshare_ok():
    row(case, "one line; resume after freeing space", "unshare -rm not available", None)
    return
  mnt = os.path.join(base, "mnt_fill")
  os.makedirs(mnt)
  wd, out = os.path.join(mnt, "wd"), os.path.join(base, "fill")
  os.makedirs(out)
  cmd = " ".join(f"'{c}'" for c in RUN + _train_args(data_dir, wd))
  script = (f"mount -t tmpfs -o size=16m tmpfs '{mnt}' || exit 9; "
            f"{cmd} 2>'{out}/err1' >/dev/null & pid=$!; i=0; "
            f"while [ ! -f '{wd}/checkpoints/{CKPT}/commit_success.txt' ] && [ $i -lt 20000 ]; "
            f"do sleep 0.01; i=$((i+1)); done; "
            f"head -c 64m /dev/zero > '{mnt}/filler' 2>/dev/null; "
            f"wait $pid; echo $? > '{out}/rc1'; "
            f"ls '{wd}/checkpoints' > '{out}/ls1'; rm '{mnt}/filler'; "
            f"{cmd} 2>'{out}/err2' >'{out}/out2'; echo $? > '{out}/rc2'; "
            f"cp -r '{wd}' '{out}/wd'")
  subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, timeout=600)
  read = lambda n: open(os.path.join(out, n)).read() if os.path.exists(os.path.join(out, n)) else ""
  rc1, rc2 = read("rc1").strip(), read("rc2").strip()
  err1 = [x for x in read("err1").splitlines() if x.strip() and not x.startswith("step ")
          and not x.startswith("train: ")]
  resumed = [x for x in read("out2").splitlines() if x.startswith("resuming ")]
  try:
    step, params = _params(os.path.join(out, "wd"))
    same = step == STEPS and _same(params, ref)
  except Exception:  # noqa: BLE001
    step, same = None, False
  ok = (rc1 == "2" and len(err1) == 1 and err1[0].startswith("error: ") and "No space" in err1[0]
        and rc2 == "0" and same)
  row(case, "exit 2, one line, last checkpoint intact; rerun resumes, params = uninterrupted",
      f"exit {rc1}: `{(err1[0] if len(err1) == 1 else ' / '.join(err1))[:140]}`; left "
      f"{' '.join(read('ls1').split())}; rerun exit {rc2} "
      f"{resumed[0].split(' from ')[-1] if resumed else 'no resume'} -> step {step}, "
      f"params {'bit-identical' if same else 'DIFFER'}".replace(base + "/", ""), ok)


# ----------------------------------------------------------------------------
# The shared inputs, and the cases as tests
# ----------------------------------------------------------------------------

def _make_data(base):
  """A 24 / 8 / 8 synface folder at S px (the CLI's `data`)."""
  data_dir = os.path.join(base, "synface")
  res = cli("data", "--out", data_dir, "--n-train", "24", "--n-val", "8", "--n-test", "8",
            "--size", str(S), "--seed", "3")
  assert res.returncode == 0, res.stderr
  return data_dir


def _reference(base, data_dir):
  """The uninterrupted run every interrupted one must end equal to:
  (workdir, parameter leaves)."""
  ref_wd = os.path.join(base, "wd_ref")
  t = time.time()
  res = cli(*_train_args(data_dir, ref_wd))
  assert res.returncode == 0, res.stderr[-2000:]
  print(f"reference run: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
  return ref_wd, _params(ref_wd)[1]


def _check(case, *args):
  """Runs one case function; fails on any row not ok, skips when all its
  rows were skipped (no `unshare`, say)."""
  start = len(ROWS)
  case(*args)
  rows = ROWS[start:]
  assert rows, f"{case.__name__} reported nothing"
  if all(ok is None for *_, ok in rows):
    pytest.skip(rows[0][2])
  bad = [f"{name}: {outcome} (expected: {want})" for name, want, outcome, ok in rows
         if ok is False]
  assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return str(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def data_dir(base):
  return _make_data(base)


@pytest.fixture(scope="module")
def reference(base, data_dir):
  return _reference(base, data_dir)


def test_structure_cyclic_m_is_never_written(tmp_path):
  _check(structure_case, str(tmp_path))


def test_renderer_finite_at_the_limits():
  _check(renderer_case)


@pytest.mark.slow
def test_bad_data_is_one_line_and_untouched(base):
  _check(data_cases, base)


@pytest.mark.slow
def test_non_fatal_data_loads_with_one_note_each(base):
  _check(data_non_fatal, base)


@pytest.mark.slow
def test_bad_config_is_one_line(base):
  _check(config_cases, base)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(base, data_dir, reference):
  _check(kill_trials, base, data_dir, reference[1], 2, 0)


@pytest.mark.slow
def test_half_written_latest_step_is_set_aside(base, data_dir, reference):
  _check(half_written_case, base, data_dir, *reference)


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips(base, data_dir):
  _check(nonfinite_cases, base, data_dir)


@pytest.mark.slow
def test_unwritable_or_full_disk_is_one_line_before_training(base, data_dir):
  _check(disk_cases, base, data_dir)


@pytest.mark.slow
def test_disk_filling_mid_run_then_rerun(base, data_dir, reference):
  _check(disk_fill_midrun, base, data_dir, reference[1])


# ----------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="2 SIGKILL trials instead of 5")
  ap.add_argument("--trials", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
  args = ap.parse_args()
  trials = args.trials if args.trials is not None else (2 if args.quick else 5)
  base = tempfile.mkdtemp(prefix="test_faults_")
  t0 = time.time()
  try:
    data_dir = _make_data(base)
    data_cases(base)
    data_non_fatal(base)
    config_cases(base)
    structure_case(base)
    ref_wd, ref = _reference(base, data_dir)
    kill_trials(base, data_dir, ref, trials, args.seed)
    half_written_case(base, data_dir, ref_wd, ref)
    nonfinite_cases(base, data_dir)
    renderer_case()
    disk_cases(base, data_dir)
    disk_fill_midrun(base, data_dir, ref)
  finally:
    if args.keep:
      print(f"scratch: {base}", file=sys.stderr)
    else:
      shutil.rmtree(base, ignore_errors=True)
  print("| case | expected | outcome | ok |")
  print("|---|---|---|---|")
  for case, exp, out, ok in ROWS:
    print(f"| {case} | {exp} | {out.replace('|', '/')} | "
          f"{ {True: 'yes', False: 'NO', None: 'skipped'}[ok] } |")
  tried = [r for r in ROWS if r[3] is not None]
  print(json.dumps(dict(cases=len(tried), ok=sum(bool(r[3]) for r in tried),
                        skipped=len(ROWS) - len(tried), seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
  main()
