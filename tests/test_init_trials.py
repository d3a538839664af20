"""Best of K initialisations (scr_jax/init_trials.py): the key rule, the choice
by the lowest trial loss among convex shapes, the depth warm-up as a trial
dimension, a run that continues the winner, and a resume that reuses the
saved choice."""
import jax
import numpy as np
import pytest

from scr_jax import config, init_trials, runner, structure as structure_lib, train_step, workdir
from scr_jax.errors import UserError


def _cfg(**kw):
  return config.replace(config.get_config("test_tiny"), **kw)


def test_candidate_zero_is_the_plain_initialisation():
  cfg = _cfg(seed=3)
  plain = jax.random.PRNGKey(3)
  assert np.array_equal(train_step.init_key(cfg), plain)
  assert np.array_equal(train_step.init_key(cfg, 0), plain)
  assert not np.array_equal(train_step.init_key(cfg, 2), plain)
  assert np.array_equal(train_step.init_key(_cfg(seed=3, init_choice=2)),
                        train_step.init_key(cfg, 2))


def test_the_lowest_trial_loss_is_chosen_and_a_resume_keeps_it(tmp_path, monkeypatch):
  calls = []

  def planted(cfg, train_data, structure, log=None):
    calls.append(cfg.init_trials)
    return init_trials.Trial(np.array([-1.0, -3.0, np.inf, -2.0]), np.ones(4), np.zeros(4))

  monkeypatch.setattr(init_trials, "run_trials", planted)
  wd = str(tmp_path / "w")
  cfg = runner.make_config("test_tiny", ["init_trials=4", "steps=2"])
  runner.train_run(cfg, wd, "builtin")
  assert workdir.load_config(wd).init_choice == 1
  assert calls == [4]
  # A resume reads the saved choice: no second trial, no settings mismatch.
  runner.train_run(runner.make_config("test_tiny", ["init_trials=4", "steps=3"]), wd, "builtin")
  assert calls == [4]
  assert workdir.load_config(wd).init_choice == 1


def _trial(loss, convex, saturated=None):
  return init_trials.Trial(np.asarray(loss, float), np.asarray(convex, float),
                           None if saturated is None else np.asarray(saturated, float))


def test_choice_is_the_lowest_loss_among_convex_candidates():
  cfg = _cfg(init_trials=4)
  # the lowest loss (1) is hollow: the lowest convex one (3) wins
  assert init_trials.choose(cfg, _trial([-1, -3, np.inf, -2], [1, 0.2, 1, 0.9])) == 3
  # none convex (or unknown): the lowest loss
  assert init_trials.choose(cfg, _trial([-1, -3, -2, 0], [0, 0, np.nan, 0])) == 1
  # the rule off: the lowest loss whatever the shape
  off = _cfg(init_trials=4, init_trial_checks=False)
  assert init_trials.choose(off, _trial([-1, -3, np.inf, -2], [1, 0, 1, 1])) == 1
  # a view run to its bound (a pitch at +60 on most images) is out, however low its loss
  assert init_trials.choose(cfg, _trial([-1, -3, -2, 0], [1, 1, 1, 1], [0, 0.9, 0.6, 0])) == 0
  assert init_trials.choose(cfg, _trial([-1, -3, -2, 0], [1, 1, 1, 1], [0, 0.4, 1, np.nan])) == 1
  # a collapsed view (the same on every image) is out too
  collapsed = init_trials.Trial(np.array([-3.0, -2.0]), np.ones(2), np.zeros(2), None,
                                np.array([0.1, 6.0]))
  assert init_trials.choose(_cfg(init_trials=2), collapsed) == 1
  # a convex candidate with a non-finite loss never wins; none finite: 0
  assert init_trials.choose(cfg, _trial([np.inf, -1, -2, -3], [1, 0, 0, 0])) == 3
  assert init_trials.choose(cfg, _trial([np.inf] * 4, [1] * 4)) == 0


def test_candidates_without_the_depth_warmup():
  cfg = config.override(_cfg(init_trials=2), ["depth_warmup_steps=300",
                                              "init_trial_depth_warmup=both"])
  assert init_trials.n_candidates(cfg) == 4
  got = [init_trials.candidate_config(cfg, c) for c in range(4)]
  assert [g.init_choice for g in got] == [0, 1, 0, 1]
  assert [g.warmup.depth_steps for g in got] == [300, 300, 0, 0]
  # nothing to switch off: only the initialisations
  assert init_trials.n_candidates(config.override(cfg, ["depth_warmup_steps=0"])) == 2
  # one initialisation, the warm-up both ways: still a trial (of 2)
  one = config.replace(cfg, init_trials=1)
  assert init_trials.n_candidates(one) == 2 and one.trials_wanted()
  assert not config.replace(one, init_trial_depth_warmup="same").trials_wanted()
  assert not config.replace(one, init_choice=0).trials_wanted()
  with pytest.raises(UserError, match="init_trial_depth_warmup"):
    config.validate(config.replace(cfg, init_trial_depth_warmup="sometimes"))


def test_a_winner_without_the_depth_warmup_is_saved_and_resumed(tmp_path, monkeypatch):
  calls = []

  def planted(cfg, train_data, structure, log=None):
    calls.append(init_trials.n_candidates(cfg))
    return _trial([-1.0, -2.0, -3.0, -4.0], [1, 1, 0, 1])  # 3: seed 1 without the warm-up

  monkeypatch.setattr(init_trials, "run_trials", planted)
  sets = ["init_trials=2", "init_trial_depth_warmup=both", "depth_warmup_steps=2", "steps=2"]
  wd = str(tmp_path / "w")
  runner.train_run(runner.make_config("test_tiny", sets), wd, "builtin")
  saved = workdir.load_config(wd)
  assert (saved.init_choice, saved.warmup.depth_steps, calls) == (1, 0, [4])
  # resumed with the same flags (depth warm-up 2 asked): the saved choice, no refusal
  runner.train_run(runner.make_config("test_tiny", sets[:-1] + ["steps=3"]), wd, "builtin")
  saved = workdir.load_config(wd)
  assert (saved.init_choice, saved.warmup.depth_steps, calls) == (1, 0, [4])
  assert workdir.restore(wd).step == 3


def test_trials_per_candidate_and_the_run_continues_the_winner(tmp_path):
  cfg = config.override(_cfg(init_trials=2, init_trial_steps=2, steps=4),
                        ["depth_warmup_steps=2", "init_trial_depth_warmup=both"])
  st = structure_lib.resolve_structure(cfg)
  rng = np.random.default_rng(0)
  data = dict(images=rng.random((8, cfg.image_size, cfg.image_size, 3), np.float32))
  lines = []
  trial = init_trials.run_trials(cfg, data, st, lines.append)
  assert trial.loss_C.shape == (4,) and np.isfinite(trial.loss_C).all()
  assert any("group 2/2 (2 candidates) step 2/2" in ln for ln in lines)  # progress
  assert len(set(trial.loss_C.tolist())) == 4  # four different candidates
  assert ((trial.convex_C >= 0) & (trial.convex_C <= 1)).all()
  assert ((trial.saturated_C >= 0) & (trial.saturated_C <= 1)).all()
  assert (trial.view_std_C >= 0).all()
  assert all(int(s.step) == 2 for s in trial.states)
  # the run continues the winner: the same parameters as training the chosen
  # candidate from scratch without trials (the same batches, steps 0..3)
  from scr_jax import train
  res = train.fit_workdir(cfg, str(tmp_path / "trials"), data, quiet=True)
  choice = init_trials.choose(cfg, trial)
  plain = config.replace(init_trials.candidate_config(cfg, choice), init_trials=1)
  ref = train.fit_workdir(plain, str(tmp_path / "plain"), data, quiet=True)
  assert res["cfg"].init_choice == plain.init_choice
  assert res["cfg"].warmup == plain.warmup
  for a, b in zip(jax.tree_util.tree_leaves(res["state"].params),
                  jax.tree_util.tree_leaves(ref["state"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_trial_losses_are_finite_per_initialisation():
  cfg = _cfg(init_trials=2, init_trial_steps=2)
  st = structure_lib.resolve_structure(cfg)
  rng = np.random.default_rng(0)
  data = dict(images=rng.random((8, cfg.image_size, cfg.image_size, 3), np.float32))
  trial = init_trials.run_trials(cfg, data, st)
  assert trial.loss_C.shape == (2,) and np.isfinite(trial.loss_C).all()
  assert trial.loss_C[0] != trial.loss_C[1]
