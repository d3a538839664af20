"""Provenance of a run (issue 12, kinds 1 and 7): the settings that produced a
checkpoint are saved in it and used to evaluate it; a resume with other
settings is refused before any work (harmless fields are accepted with a
note); `--no-resume` on a used workdir needs `--restart`; a default structure
search ends with a DAG, dropping the weakest cycle edges with a note."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import fault_cases  # tests/fault_cases.py
from scr_jax import bilevel, checkpoint, config, data, search, structure, train
from scr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]
S = 16


def _cli(*args, timeout=600):
  return subprocess.run(RUN + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout)


def _ok(res):
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _one_error(res, *needles):
  lines = [x for x in res.stderr.splitlines() if x.strip()]
  assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


def _mad(workdir, data_root, tmp):
  out = os.path.join(tmp, f"eval_{time.time_ns()}.json")
  res = _ok(_cli("eval", "--workdir", workdir, "--data", data_root, "--out", out))
  with open(out) as fh:
    return json.load(fh)["mad_mean"], res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two synface folders (different content, same layout) and a workdir
  trained 6 steps on the first (checkpoints at 2, 4, 6)."""
  base = tmp_path_factory.mktemp("prov")
  d1, d2 = str(base / "d1"), str(base / "d2")
  data.export_synface(d1, n_train=24, n_val=8, n_test=8, size=S, seed=3, verbose=False)
  data.export_synface(d2, n_train=24, n_val=8, n_test=8, size=S, seed=4, verbose=False)
  wd = str(base / "wd")
  _ok(_cli("train", "--preset", "test_tiny", "--data", d1, "--workdir", wd, "--steps", 6))
  return d1, d2, wd


def test_settings_are_saved_in_every_checkpoint(trained):
  d1, _, wd = trained
  ck = os.path.join(wd, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
  assert steps == [2, 4, 6]
  for step in steps:
    s = checkpoint.load_settings(wd, step)
    assert s["step"] == step
    cfg = checkpoint.settings_config(s)
    assert cfg.preset == "test_tiny" and cfg.steps == 6 and cfg.depth_prior == 0.0
    assert s["structure"]["variant"] == "independent" and s["structure"]["q"] is None
    np.testing.assert_array_equal(s["structure"]["M"], np.zeros((4, 4)))
    assert s["data"]["spec"] == os.path.abspath(d1) and s["data"]["n_images"] == 24
    imgs = data.load_synface(d1, "train", S)["images"]
    # the hash of the float32 pixels the model saw, computed here independently
    want = hashlib.blake2b(np.ascontiguousarray(imgs, np.float32).data, digest_size=12)
    assert s["data"]["hash"] == want.hexdigest()


def test_refused_resume_leaves_weights_settings_and_mad_alone(trained, tmp_path):
  """The issue's case: 6 steps, then `train --steps 3 --set depth_prior=1.0`
  on the same workdir. Refused in one line before any work; nothing in the
  workdir changes; eval of the step-6 weights gives the same MAD after."""
  d1, _, wd = trained
  mad_before, _ = _mad(wd, d1, str(tmp_path))
  before = fault_cases.snapshot(wd, contents=True)
  t0 = time.time()
  res = _cli("train", "--preset", "test_tiny", "--data", d1, "--workdir", wd, "--steps", 3,
             "--set", "depth_prior=1.0")
  _one_error(res, wd, "step 6", "depth_prior: 0.0 -> 1.0", "--restart")
  assert "steps" not in res.stderr.split("(")[1].split(")")[0]  # harmless: not listed
  assert time.time() - t0 < 30  # nothing compiled
  assert fault_cases.snapshot(wd, contents=True) == before
  mad_after, _ = _mad(wd, d1, str(tmp_path))
  assert mad_after == mad_before


def test_eval_uses_the_checkpoints_settings_not_config_json(trained, tmp_path):
  """What main did on a refused resume: config.json rewritten with another
  depth_prior. eval must still rebuild the model of the checkpoint."""
  d1, _, wd0 = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  mad_ref, _ = _mad(wd, d1, str(tmp_path))
  cfg = checkpoint.load_config(wd)
  checkpoint.save_config(wd, config.override(cfg, ["depth_prior=1.0"]))
  mad, _ = _mad(wd, d1, str(tmp_path))
  assert mad == mad_ref
  # An older workdir (no settings in its checkpoints) falls back to
  # config.json, with a note: here that is the rewritten one, so MAD moves.
  # (A step made before settings were saved: its settings item taken out.)
  for n in os.listdir(os.path.join(wd, "checkpoints")):
    p = os.path.join(wd, "checkpoints", n, checkpoint.SETTINGS_ITEM)
    if os.path.exists(p):
      shutil.rmtree(p)
  mad_old, res = _mad(wd, d1, str(tmp_path))
  assert "note: checkpoint step 6" in res.stderr and "older workdir" in res.stderr
  assert mad_old != mad_ref
  checkpoint.save_config(wd, cfg)  # the true config back: the same numbers again
  mad_old, _ = _mad(wd, d1, str(tmp_path))
  assert mad_old == mad_ref


@pytest.mark.parametrize("data_name,args,needle", [
    ("d1", ["--set", "batch_size=2"], "batch_size: 4 -> 2"),
    ("d1", ["--seed", "1"], "seed: 0 -> 1"),
    ("d1", ["--variant", "dense", "--order", "DVAL"], "M: no edges -> edges V->L"),
    ("d2", [], "data: 24 images 16x16x3 (hash "),  # same layout, other images
])
def test_resume_with_other_settings_is_refused(trained, data_name, args, needle):
  d1, d2, wd = trained
  before = fault_cases.snapshot(wd, contents=True)
  res = _cli("train", "--preset", "test_tiny", "--data", d1 if data_name == "d1" else d2,
             "--workdir", wd, "--steps", 8, *args)
  _one_error(res, wd, needle)
  assert fault_cases.snapshot(wd, contents=True) == before


def test_harmless_change_is_accepted_with_a_note(trained, tmp_path):
  d1, _, wd0 = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  # 1. nothing to train (already at step 6): a note, and nothing rewritten
  before = fault_cases.snapshot(wd, contents=True)
  res = _ok(_cli("train", "--preset", "test_tiny", "--data", d1, "--workdir", wd, "--steps", 6,
                 "--set", "log_every=3"))
  assert "note: resuming" in res.stderr and "log_every: 1 -> 3" in res.stderr
  assert "nothing trained, nothing written" in res.stderr
  assert fault_cases.snapshot(wd, contents=True) == before
  # 2. train on to step 8 from another path to the same data: both noted;
  # the new checkpoint carries the new harmless values
  d1_copy = str(tmp_path / "same_data")
  shutil.copytree(d1, d1_copy)
  res = _ok(_cli("train", "--preset", "test_tiny", "--data", d1_copy, "--workdir", wd,
                 "--steps", 8, "--set", "log_every=3"))
  note = [x for x in res.stderr.splitlines() if x.startswith("note: resuming")]
  assert len(note) == 1, res.stderr
  for n in ("log_every: 1 -> 3", "steps: 6 -> 8", f"data path: {os.path.abspath(d1)} -> "):
    assert n in note[0], (n, note[0])
  assert "resuming" in res.stdout and "from step 6" in res.stdout
  s8 = checkpoint.load_settings(wd, 8)
  assert s8["config"]["log_every"] == 3 and s8["config"]["steps"] == 8
  assert checkpoint.load_settings(wd, 6)["config"]["log_every"] == 1
  assert json.load(open(os.path.join(wd, "config.json")))["log_every"] == 3


def test_no_resume_on_used_workdir_is_refused_before_any_work(trained, tmp_path):
  _, _, wd = trained
  empty = str(tmp_path / "empty")
  os.makedirs(empty)  # would fail to load: the refusal must come first
  before = fault_cases.snapshot(wd, contents=True)
  res = _cli("train", "--preset", "test_tiny", "--data", empty, "--workdir", wd, "--no-resume")
  _one_error(res, wd, "step 6", "--restart")
  assert fault_cases.snapshot(wd, contents=True) == before


def test_restart_sets_the_old_run_aside(trained, tmp_path):
  d1, _, wd0 = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  res = _ok(_cli("train", "--preset", "test_tiny", "--data", d1, "--workdir", wd, "--steps", 2,
                 "--set", "depth_prior=1.0", "--no-resume", "--restart"))
  assert "note: --restart: moved" in res.stderr
  prev = [n for n in os.listdir(wd) if n.startswith("previous-")]
  assert len(prev) == 1
  old = os.path.join(wd, prev[0])
  assert sorted(os.listdir(os.path.join(old, "checkpoints"))) == ["2", "4", "6"]
  assert checkpoint.load_settings(old, 6)["config"]["depth_prior"] == 0.0
  assert sorted(n for n in os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
  assert checkpoint.load_settings(wd, 2)["config"]["depth_prior"] == 1.0


def test_fit_api_refuses_resume_false_on_used_workdir(trained):
  d1, _, wd = trained
  tr = data.load_synface(d1, "train", S)
  cfg = checkpoint.settings_config(checkpoint.load_settings(wd, 6))
  before = fault_cases.snapshot(wd, contents=True)
  with pytest.raises(UserError, match="already holds checkpoints"):
    train.fit_workdir(cfg, wd, tr, resume=False, quiet=True)
  other = config.override(cfg, ["lr=0.001"])
  with pytest.raises(UserError, match=r"lr: 0\.0001 -> 0\.001"):
    train.fit_workdir(other, wd, tr, quiet=True)
  assert fault_cases.snapshot(wd, contents=True) == before


def test_compare_settings_names_fields():
  cfg = config.get_config("test_tiny")
  m0 = np.zeros((4, 4), np.float32)
  a = checkpoint.run_settings(cfg, structure.Structure(m=m0), data=dict(spec="/a", n_images=3, image_shape=[4, 4, 3],
                                                  hash="ab" * 12))
  b = checkpoint.run_settings(config.override(cfg, ["eval_every=7", "lam_flip=1.0"]),
                              structure.Structure(m=structure.dense_matrix("DVAL"),
                                                  variant="dense"),
                              data=dict(spec="/b", n_images=3, image_shape=[4, 4, 3],
                                        hash="ab" * 12))
  changed, harmless = checkpoint.compare_settings(a, b)
  assert [c[0] for c in changed] == ["lam_flip", "M"]
  assert changed[1][2] == "edges V->L,V->A,D->V,D->L,D->A,A->L"
  assert [h[0] for h in harmless] == ["eval_every", "variant", "data path"]
  assert checkpoint.compare_settings(a, a) == ([], [])


# ----------------------------------------------------------------------------
# Kind 7: a default structure search ends with a DAG
# ----------------------------------------------------------------------------

def test_threshold_dag_drops_only_the_weakest_cycle_edges():
  m = np.zeros((4, 4), np.float32)
  # V -> D -> L -> V (weakest L->V 0.3) and D <-> L (weakest L->D 0.2);
  # V -> A at 0.15 (A is a sink: on no cycle) is kept although the weakest.
  m[0, 1], m[1, 2], m[2, 0] = 0.9, 0.8, 0.3
  m[2, 1] = 0.2
  m[0, 3] = 0.15
  m[2, 3] = 0.05  # under the threshold
  out, dropped = bilevel.threshold_dag(m, 0.1)
  assert structure.is_dag(out)
  assert dropped == [("L", "D", pytest.approx(0.2)), ("L", "V", pytest.approx(0.3))]
  kept = {(structure.FACTORS[i], structure.FACTORS[j]) for i, j in zip(*np.nonzero(out))}
  assert kept == {("V", "D"), ("D", "L"), ("V", "A")}
  assert set(np.unique(out)) == {0.0, 1.0}
  w, _ = bilevel.threshold_dag(m, 0.1, binarize=False)
  assert w[0, 3] == pytest.approx(0.15) and w[2, 0] == 0
  # raising the threshold instead loses the acyclic V->A edge too
  raised, tau = bilevel.threshold_to_dag(m, 0.1)
  assert tau == pytest.approx(0.3) and raised[0, 3] == 0
  dag = structure.dense_matrix("DVAL") * 0.5
  assert bilevel.threshold_dag(dag, 0.1)[1] == []


def test_default_unroll_search_ends_with_a_dag(trained, tmp_path):
  """The issue's case: `search --method unroll --budget-steps 5 --evals 4` on
  small generated data ends with a usable structure.json (the augmented
  Lagrangian by default, weakest cycle edges dropped and named), and a
  strict refusal needs an explicit --threshold."""
  d1, _, _ = trained
  wd = str(tmp_path / "search")
  res = _ok(_cli("search", "--method", "unroll", "--preset", "test_tiny", "--data", d1,
                 "--workdir", wd, "--budget-steps", 5, "--evals", 4))
  s = structure.load_structure(os.path.join(wd, "structure.json"))
  m = np.asarray(s["M"])
  assert structure.is_dag(m) and np.any(m != 0)
  trace = json.load(open(os.path.join(wd, "unroll_trace.json")))
  assert trace["augmented"] is True and trace["on_cycle"] == "drop-weakest"
  notes = [x for x in res.stderr.splitlines() if "dropped its weakest edge" in x]
  assert len(notes) == len(trace["dropped_edges"]) == len(s["dropped_edges"])
  cont = np.asarray(trace["m_continuous"])
  for note, edge in zip(notes, trace["dropped_edges"]):
    assert note.startswith("note: ") and edge in note
    g, f = (structure.FACTORS.index(x) for x in edge.split("->"))
    assert abs(cont[g, f]) > 0.1 and m[g, f] == 0  # above the threshold, yet dropped
  # every edge above the threshold that was not dropped is kept
  above = (np.abs(cont) > 0.1) & ~np.eye(4, dtype=bool)
  assert int(above.sum()) == int((m != 0).sum()) + len(notes)
  # the strict refusal is only for an explicit threshold, and before any work
  res = _cli("search", "--method", "unroll", "--preset", "test_tiny", "--data", d1,
             "--workdir", str(tmp_path / "s2"), "--on-cycle", "refuse")
  _one_error(res, "--on-cycle refuse needs an explicit --threshold")
  if notes:  # the same search, strict at the same threshold: refused, nothing written
    wd3 = str(tmp_path / "s3")
    res = _cli("search", "--method", "unroll", "--preset", "test_tiny", "--data", d1,
               "--workdir", wd3, "--budget-steps", 5, "--threshold", 0.1,
               "--on-cycle", "refuse")
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and "cycle after thresholding at 0.1" in errors[0]
    assert res.stderr.splitlines()[-1] == errors[0]
    assert not os.path.exists(os.path.join(wd3, "structure.json"))


def test_search_rerun_with_other_settings_is_refused(tmp_path):
  """A search workdir reuses finished evaluations (scores.json): a rerun with
  settings that change them is refused before any data is read."""
  wd = str(tmp_path / "s")
  checkpoint.save_config(wd, config.override(config.get_config("test_tiny"), ["lr=0.001"]))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)  # would fail to load: the refusal must come first
  res = _cli("search", "--method", "bo", "--preset", "test_tiny", "--data", empty,
             "--workdir", wd, "--budget-steps", 2)
  _one_error(res, wd, "lr: 0.001 -> 0.0001")
