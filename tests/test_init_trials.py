"""Best of K initialisations (scr_jax/init_trials.py): the key rule, the choice
by the lowest trial loss, and a resume that reuses the saved choice."""
import jax
import numpy as np

from scr_jax import config, init_trials, runner, structure as structure_lib, train_step, workdir


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

  def planted(cfg, train_data, structure):
    calls.append(cfg.init_trials)
    return np.array([-1.0, -3.0, np.inf, -2.0])

  monkeypatch.setattr(init_trials, "trial_losses", planted)
  wd = str(tmp_path / "w")
  cfg = runner.make_config("test_tiny", ["init_trials=4", "steps=2"])
  runner.train_run(cfg, wd, "builtin")
  assert workdir.load_config(wd).init_choice == 1
  assert calls == [4]
  # A resume reads the saved choice: no second trial, no settings mismatch.
  runner.train_run(runner.make_config("test_tiny", ["init_trials=4", "steps=3"]), wd, "builtin")
  assert calls == [4]
  assert workdir.load_config(wd).init_choice == 1


def test_trial_losses_are_finite_per_initialisation():
  cfg = _cfg(init_trials=2, init_trial_steps=2)
  st = structure_lib.resolve_structure(cfg)
  rng = np.random.default_rng(0)
  data = dict(images=rng.random((8, cfg.image_size, cfg.image_size, 3), np.float32))
  losses = init_trials.trial_losses(cfg, data, st)
  assert losses.shape == (2,) and np.isfinite(losses).all()
  assert losses[0] != losses[1]
