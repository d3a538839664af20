"""Every producer of a training workdir leaves one that `eval` and `predict`
read back (scr_jax/workdir.py): run.py train, train --candidates, search bo
(evals/*), search unroll, reproduce's training runs and its candidate
(Figure 6) run, import-unsup3d (tests/test_unsup3d_import.py)."""
import glob
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

from scr_jax import cli
from scr_jax import config, export, reproduce, structure, train, workdir

STEPS = ["--steps", "2"]


def _cli(capfd, *argv):
  """run.py in-process: (exit code, stderr)."""
  capfd.readouterr()
  code, stderr = 0, sys.stderr
  try:
    cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  finally:
    sys.stderr = stderr  # cliutil.fail silences stderr after its one line
  return code, capfd.readouterr().err


@pytest.fixture(scope="module")
def image(tmp_path_factory, tiny_synface):
  """One test image as a file, the input of every predict."""
  path = str(tmp_path_factory.mktemp("img") / "face.png")
  src = sorted(glob.glob(os.path.join(tiny_synface, "test", "image", "*.png")))[0]
  Image.open(src).save(path)
  return path


def _eval_and_predict(capfd, tmp_path, wd, data, image, candidate=None):
  """Runs eval and predict on `wd`; returns the eval summary."""
  out = str(tmp_path / f"eval_{os.path.basename(wd)}.json")
  code, err = _cli(capfd, "eval", "--workdir", wd, "--data", data, "--split", "test",
                   "--out", out)
  assert code == 0, err[-2000:]
  with open(out) as fh:
    summ = json.load(fh)
  rows = summ["candidates"] if "candidates" in summ else [summ]
  for row in rows:
    assert row["n"] + row["n_skipped"] == 8 and row["n"] > 0  # (2 steps: some skipped)
    assert np.isfinite(row["mad_mean"]) and 0 <= row["mad_mean"] <= 90
    # units said beside the numbers: side_* x1e-2 (as the paper), side_raw_* as Unsup3D
    assert row["side_unit"].startswith("x1e-2") and row["mad_unit"] == "degrees"
    assert row["side_raw_mean"] == pytest.approx(row["side_mean"] / 100)
  for b in summ.get("baselines", {}).values():
    assert b["side_raw_mean"] == pytest.approx(b["side_mean"] / 100)
  pred = str(tmp_path / f"pred_{os.path.basename(wd)}")
  extra = ["--candidate", candidate] if candidate is not None else []
  code, err = _cli(capfd, "predict", "--workdir", wd, "--images", image, "--out", pred,
                   "--video-size", "16", *extra)
  assert code == 0, err[-2000:]
  written = [f for f in os.listdir(os.path.join(pred, "face"))]
  assert len(written) == len(export.video_plan(export.FILES)[0])
  return summ


def test_train(capfd, tmp_path, tiny_synface, image):
  wd = str(tmp_path / "train")
  assert _cli(capfd, "train", "--preset", "test_tiny", "--data", tiny_synface, "--workdir", wd,
              "--variant", "dynamic", "--order", "DVAL", "--q", "cosine", *STEPS)[0] == 0
  r = workdir.restore(wd)
  assert (r.step, r.structure.variant, r.structure.q) == (2, "dynamic", "cosine")
  np.testing.assert_array_equal(r.structure.m, structure.dense_matrix("DVAL"))
  _eval_and_predict(capfd, tmp_path, wd, tiny_synface, image)


def test_train_candidates(capfd, tmp_path, tiny_synface, image):
  wd = str(tmp_path / "cands")
  assert _cli(capfd, "train", "--preset", "test_tiny", "--data", tiny_synface, "--workdir", wd,
              "--candidates", "DVAL,LADV", *STEPS)[0] == 0
  summ = _eval_and_predict(capfd, tmp_path, wd, tiny_synface, image, candidate="LADV")
  assert [c["order"] for c in summ["candidates"]] == ["DVAL", "LADV"]
  # without --candidate: one line naming the candidates
  code, err = _cli(capfd, "predict", "--workdir", wd, "--images", image, "--out",
                   str(tmp_path / "p2"))
  assert code == 2 and "DVAL, LADV" in err and "--candidate" in err
  code, err = _cli(capfd, "predict", "--workdir", wd, "--images", image, "--out",
                   str(tmp_path / "p3"), "--candidate", "VDLA")
  assert code == 2 and "not among" in err


def test_search_bo_evals(capfd, tmp_path, tiny_synface, image):
  wd = str(tmp_path / "bo")
  assert _cli(capfd, "search", "--method", "bo", "--preset", "test_tiny", "--data", tiny_synface,
              "--workdir", wd, "--budget-steps", "1", "--evals", "2", "--init", "2",
              "--batch", "2")[0] == 0
  (ev,) = glob.glob(os.path.join(wd, "evals", "*"))
  r = workdir.restore(ev)
  assert r.k == 2 and r.structure.variant == "dense"
  _eval_and_predict(capfd, tmp_path, ev, tiny_synface, image, candidate="0")


def test_search_unroll(capfd, tmp_path, tiny_synface, image):
  wd = str(tmp_path / "unroll")
  assert _cli(capfd, "search", "--method", "unroll", "--preset", "test_tiny", "--data",
              tiny_synface, "--workdir", wd, "--budget-steps", "1")[0] == 0
  r = workdir.restore(wd)
  with open(os.path.join(wd, "structure.json")) as fh:
    cont = np.asarray(json.load(fh)["m_continuous"], np.float32)
  assert r.structure.variant == "generic" and r.step == 1
  np.testing.assert_allclose(r.structure.m, cont, atol=1e-5)  # the M it was trained with
  _eval_and_predict(capfd, tmp_path, wd, tiny_synface, image)


def test_reproduce_runs(capfd, tmp_path, tiny_synface, image):
  """A reproduce training unit (Tables 1-2), its supervised unit (`train.fit`
  with another objective) and the candidates run of Figure 6 (`train.fit` on
  `structure.candidates` with 'independent'), at K = 2."""
  cfg = config.override(config.get_config("test_tiny"), ["steps=2"])
  b = reproduce.Budget(preset="test_tiny", data=tiny_synface, seeds=1).resolved(cfg)
  rep = reproduce.Reproduction(str(tmp_path), cfg, b)
  res = rep.run_unit(reproduce.Unit("t2.dense-DAVL.s0", "train", row="dense", order="DAVL"))
  wd = str(tmp_path / "runs" / "t2.dense-DAVL.s0")
  r = workdir.restore(wd)
  assert r.structure.variant == "dense" and r.cfg.variant == "dense"
  np.testing.assert_array_equal(r.structure.m, structure.dense_matrix("DAVL"))
  assert res["label"] == "DAVL" and res["steps"] == 2
  with open(os.path.join(wd, "adjacency.json")) as fh:
    assert json.load(fh)["variant"] == "dense"
  _eval_and_predict(capfd, tmp_path, wd, tiny_synface, image)
  # the supervised upper bound: same init and batch order, through train.fit
  sup = rep.run_unit(reproduce.Unit("t1.supervised.s0", "supervised", row="supervised"))
  assert sup["steps"] == 2 and sup["test"]["n"] == 8 and np.isfinite(sup["test"]["mad_mean"])
  assert (sup["init_hash"], sup["batch_hash"]) == (res["init_hash"], res["batch_hash"])
  assert workdir.restore(str(tmp_path / "runs" / "t1.supervised.s0")).step == 2
  wd6 = str(tmp_path / "fig6")
  train.fit_workdir(cfg, wd6, rep.data("default")["train"], None,
                    structure.candidates(["DVAL", "independent"]), quiet=True)
  r6 = workdir.restore(wd6)
  assert r6.structure.orders == ("DVAL", "independent")
  assert r6.candidate("independent").structure.variant == "independent"
  _eval_and_predict(capfd, tmp_path, wd6, tiny_synface, image, candidate="independent")


def test_make_run_job_end_to_end(capfd, tmp_path):
  # `make run` (run.py main) for 2 steps: train, eval with the three baselines,
  # predict and the diagnostics, one summary table.
  wd = str(tmp_path / "main")
  capfd.readouterr()
  code = 0
  try:
    cli.main(["main", "--workdir", wd, "--steps", "2", "--set", "eval_every=2", "--set",
              "ckpt_every=2"])
  except SystemExit as e:
    code = e.code
  out, err = capfd.readouterr()
  assert code in (0, None), err[-2000:]
  assert "template depth, true view" in out and "independent SCR (ours)" in out
  with open(os.path.join(wd, "eval_test.json")) as fh:
    summ = json.load(fh)
  assert summ["step"] == 2 and set(summ["baselines"]) == {
      "constant null depth", "average GT depth", "template depth, true view"}
  assert len(glob.glob(os.path.join(wd, "predict", "*", "depth.npy"))) == 4
  assert os.path.exists(os.path.join(wd, "diagnose_test.json"))


def test_make_run_budget_covers_the_whole_job():
  # --max-seconds caps the whole `make run` job: training gets what is left
  # after data generation and the evaluation / predict that follow it.
  from scr_jax import runner
  assert runner.training_budget(None, 30.0) is None
  assert runner.training_budget(600, 30.0) == 600 - 30.0 - runner.AFTER_TRAINING_S
  assert runner.training_budget(100, 50.0) == 10.0  # never below a tenth of the job
