"""Training aids that make unsupervised learning robust (Config fields that are
0 / off in the `paper` preset): what each one changes, and that off is a no-op."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scr_jax import config, losses, model, structure, train_step, warmup
from scr_jax.warmup import Warmups
from scr_jax.errors import UserError


def _tiny(**kw):
  # config.replace: the warm-ups by their flat names (sym_warmup_steps=10)
  return config.replace(config.get_config("test_tiny"), **kw)


def _warm(cfg, s):
  return warmup.warmups(cfg, None if s is None else jnp.int32(s))


def test_sym_weight_schedule():
  cfg = _tiny(sym_warmup_steps=10)
  got = [float(_warm(cfg, s).sym) for s in (0, 4, 5, 6, 8, 10, 50)]
  np.testing.assert_allclose(got, [1, 1, 1, 0.8, 0.4, 0, 0], atol=1e-6)
  assert _warm(cfg, None).sym is None  # evaluation: never symmetrised
  assert _warm(_tiny(), 0).sym is None  # off by default


def test_symmetrize_makes_canonical_maps_mirror_symmetric():
  cfg = _tiny()
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  # init_state zeroes the depth head (flat start): give it random weights so
  # the free depth is not symmetric to begin with
  p = state.params["params"]["f2_D"]
  last = max((k for k in p if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
  p[last]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(3), p[last]["kernel"].shape)
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  free = model.factors(nets, state.params, img, m, cfg)
  full = model.factors(nets, state.params, img, m, cfg, Warmups(sym=1.0))
  half = model.factors(nets, state.params, img, m, cfg, Warmups(sym=0.5))
  for k in ("depth_BxSxS", "albedo_BxSxSx3"):
    a = np.asarray(getattr(full, k))
    np.testing.assert_allclose(a, a[:, :, ::-1], atol=1e-6)
    f = np.asarray(getattr(free, k))
    assert np.abs(f - f[:, :, ::-1]).max() > 1e-4  # the free maps are not symmetric
    np.testing.assert_allclose(np.asarray(getattr(half, k)), (f + a) / 2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(getattr(model.factors(
        nets, state.params, img, m, cfg, Warmups(sym=0.0)), k)), f, atol=1e-6)
  # view and light are untouched
  np.testing.assert_allclose(np.asarray(full.view_Bx6), np.asarray(free.view_Bx6))
  # sym_warmup_maps: only the maps named are held symmetric
  both = model.factors(nets, state.params, img, m, _tiny(sym_warmup_maps=" albedo, depth"),
                       Warmups(sym=1.0))
  for k in ("depth_BxSxS", "albedo_BxSxSx3"):  # spaces and order do not matter
    np.testing.assert_allclose(np.asarray(getattr(both, k)), np.asarray(getattr(full, k)),
                               atol=1e-6)
  for maps, held, kept in (("albedo", "albedo_BxSxSx3", "depth_BxSxS"),
                           ("depth", "depth_BxSxS", "albedo_BxSxSx3")):
    one = model.factors(nets, state.params, img, m, _tiny(sym_warmup_maps=maps),
                        Warmups(sym=1.0))
    np.testing.assert_allclose(np.asarray(getattr(one, held)), np.asarray(getattr(full, held)),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(getattr(one, kept)), np.asarray(getattr(free, kept)),
                               atol=1e-6)


@pytest.mark.parametrize("maps", ["", "normals", "albedo,albedo", "depth;albedo"])
def test_sym_warmup_maps_rejects_unknown_maps(maps):
  with pytest.raises(UserError, match="sym_warmup_maps"):
    config.override(config.get_config("test_tiny"), [f"sym_warmup_maps={maps}"])


def test_confidence_warmup_replaces_sigma_until_its_step():
  cfg = _tiny(conf_warmup_steps=5)
  img = jnp.full((1, 4, 4, 3), 0.75)  # target 0.5 in [-1, 1]
  half = model.Rendering(*([None] * 5), recon_mask_BxSxS=jnp.ones((1, 4, 4)),
                         recon_im_BxSxSx3=jnp.zeros((1, 4, 4, 3)))
  out = model.ForwardOutput(factors=None, orig=half, flip=half,
                            sigma_l1_BxSxSx2=jnp.full((1, 4, 4, 2), 0.25),
                            sigma_perc_BxTxTx2=None, input_BxSxSx3=model.to_model_range(img))
  l1_sigma1 = 0.5 * np.sqrt(2.0)  # |0 - 0.5| sqrt(2) / 1 + log 1
  l1_pred = 0.5 * np.sqrt(2.0) / 0.25 + np.log(0.25)
  during, _ = losses.total_loss(out, cfg, warmups=_warm(cfg, 4))
  after, _ = losses.total_loss(out, cfg, warmups=_warm(cfg, 5))
  evaluation, _ = losses.total_loss(out, cfg)
  np.testing.assert_allclose(float(during), (1 + cfg.lam_flip) * l1_sigma1, rtol=1e-5)
  np.testing.assert_allclose(float(after), (1 + cfg.lam_flip) * l1_pred, rtol=1e-5)
  np.testing.assert_allclose(float(evaluation), float(after), rtol=1e-6)


def test_train_step_uses_the_state_step_for_warmups():
  """The same params and batch give different losses inside and after the
  symmetry warm-up: the jitted step reads the step from the state."""
  cfg = _tiny(sym_warmup_steps=4)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(2), (4, 16, 16, 3))
  step_fn = train_step.make_train_step(nets, cfg)
  copy = lambda s: jax.tree_util.tree_map(jnp.array, s)
  _, met0 = step_fn(copy(state), img, structure.Structure(m=jnp.zeros((4, 4))))
  late = copy(state).replace(step=jnp.int32(100))
  _, met1 = step_fn(late, img, structure.Structure(m=jnp.zeros((4, 4))))
  want0 = train_step.loss_fn(state.params, nets, img, structure.Structure(m=jnp.zeros((4, 4))), cfg, step=jnp.int32(0))[0]
  want1 = train_step.loss_fn(state.params, nets, img, structure.Structure(m=jnp.zeros((4, 4))), cfg)[0]
  np.testing.assert_allclose(float(met0["loss"]), float(want0), rtol=1e-5)
  np.testing.assert_allclose(float(met1["loss"]), float(want1), rtol=1e-5)
  assert abs(float(want0) - float(want1)) > 1e-6


def test_translation_warmup_holds_the_view_translation_at_zero():
  cfg = _tiny(trans_warmup_steps=10, xy_translation_range=0.1)
  got = [float(_warm(cfg, s).trans) for s in (0, 5, 6, 8, 10, 50)]
  np.testing.assert_allclose(got, [0, 0, 0.2, 0.6, 1, 1], atol=1e-6)
  assert _warm(cfg, None).trans is None and _warm(_tiny(), 0).trans is None
  raw = jnp.array([[0.5, -0.5, 0.25, 0.8, -0.6, 0.3]])
  full = np.asarray(model.view_from_raw(raw, cfg))
  held = np.asarray(model.view_from_raw(raw, cfg, trans=0.0))
  half = np.asarray(model.view_from_raw(raw, cfg, trans=0.5))
  np.testing.assert_allclose(held[:, :3], full[:, :3])  # rotations untouched
  np.testing.assert_allclose(held[:, 3:], 0.0)
  np.testing.assert_allclose(half[:, 3:], full[:, 3:] / 2, rtol=1e-6)
  np.testing.assert_allclose(full[0, 3:5], [0.08, -0.06], rtol=1e-6)


def test_tilt_warmup_holds_pitch_and_roll_not_yaw():
  cfg = _tiny(tilt_warmup_steps=10)
  np.testing.assert_allclose(
      [float(_warm(cfg, s).tilt) for s in (0, 5, 8, 10)], [0, 0, 0.6, 1], atol=1e-6)
  assert _warm(_tiny(), 0).tilt is None
  raw = jnp.array([[0.5, -0.5, 0.25, 0.8, -0.6, 0.3]])
  full = np.asarray(model.view_from_raw(raw, cfg))
  held = np.asarray(model.view_from_raw(raw, cfg, tilt=jnp.float32(0.0)))
  np.testing.assert_allclose(held[0, [0, 2]], 0.0)  # pitch, roll held
  np.testing.assert_allclose(held[0, 1], full[0, 1])  # yaw free
  np.testing.assert_allclose(held[0, 3:], full[0, 3:])  # translation untouched


def test_depth_warmup_starts_from_the_convex_prior():
  cfg = _tiny(depth_warmup_steps=10, depth_prior=1.0)
  cam = model.camera(cfg)
  raw = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16))
  prior_only = np.asarray(model.depth_from_raw(jnp.zeros((2, 16, 16)), cam, 1.0))
  held = np.asarray(model.depth_from_raw(raw, cam, 1.0, _warm(cfg, 3).depth))
  free = np.asarray(model.depth_from_raw(raw, cam, 1.0))
  np.testing.assert_allclose(held, prior_only, atol=1e-6)  # the network is muted
  assert np.abs(free - prior_only).max() > 1e-3
  late = np.asarray(model.depth_from_raw(raw, cam, 1.0, _warm(cfg, 10).depth))
  np.testing.assert_allclose(late, free, atol=1e-6)
  assert _warm(_tiny(), 0).depth is None


def _depth_leaves(params):
  return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
      {n: params["params"][n] for n in ("f1_D", "f2_D")})}


def test_depth_warmup_keeps_the_cut_off_depth_net_intact():
  # The depth warm-up scales the depth net's output by 0, so its loss gradient
  # is exactly 0; Adam + coupled weight decay used to shrink those weights by
  # ~lr per step anyway (the depth encoder ended at 1e-14: one template face).
  # With warm-ups the decay skips what the loss does not see.
  cfg = _tiny(depth_warmup_steps=40, lr=1e-2, weight_decay=5e-2)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  before = _depth_leaves(state.params)
  step = train_step.make_train_step(nets, cfg)
  img = jax.random.uniform(jax.random.PRNGKey(1), (cfg.batch_size, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  for _ in range(5):  # steps 0..4: depth scale 0
    state, metrics = step(state, img, m)
  after = _depth_leaves(state.params)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
  # ...and the rest of the model did train (and decay) meanwhile
  enc_v0 = np.asarray(train_step.init_state(cfg, jax.random.PRNGKey(0))[1].params["params"]
                      ["f1_V"]["Conv_0"]["kernel"])
  assert np.abs(np.asarray(state.params["params"]["f1_V"]["Conv_0"]["kernel"]) - enc_v0).max() > 1e-3


def test_decay_where_trained_is_coupled_l2_where_the_gradient_is_not_zero():
  tx = train_step.decay_where_trained(0.5)
  g = {"a": jnp.array([0.0, 1.0, -2.0])}
  p = {"a": jnp.array([4.0, 4.0, 4.0])}
  upd, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(np.asarray(upd["a"]), [0.0, 3.0, 0.0])


def test_paper_optimizer_is_unsup3d_coupled_l2():
  cfg = config.get_config("paper")
  assert not cfg.warmup.any_on()
  tx = train_step.make_optimizer(cfg)
  g = {"a": jnp.array([0.0, 1.0])}
  p = {"a": jnp.array([4.0, 4.0])}
  upd, _ = tx.update(g, tx.init(p), p)
  # decay applies to the zero-gradient element too (Adam's first step: -lr sign)
  np.testing.assert_allclose(np.asarray(upd["a"]), [-cfg.lr, -cfg.lr], rtol=1e-3)


_ADAM_PARAMS = {"w": jnp.ones(3)}


def _adam_steps(cfg, k):
  """(|update| of each of k optimiser steps under a constant gradient, the
  final optimiser state): Adam's |m / sqrt(v)| is 1, so each is that step's lr."""
  tx = train_step.make_optimizer(cfg)
  grads = {"w": jnp.full(3, 2.0)}
  state, out = tx.init(_ADAM_PARAMS), []
  for _ in range(k):
    upd, state = tx.update(grads, state, _ADAM_PARAMS)
    out.append(float(jnp.abs(upd["w"][0])))
  return out, state


def test_lr_cosine_schedule_decays_adam_steps_to_the_floor():
  """lr_cosine_steps=N: Adam's step (a constant gradient, so |m/sqrt(v)| = 1)
  follows lr * (floor + (1 - floor) (1 + cos(pi k / N)) / 2) and stays at the
  floor after N; 0 keeps a constant lr and Adam's state without a count."""
  n = 10
  steps = _adam_steps
  cfg = _tiny(lr_cosine_steps=n)
  got, _ = steps(cfg, n + 3)
  floor = train_step.LR_COSINE_FLOOR
  want = [cfg.lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(k, n) / n)))
          for k in range(n + 3)]
  np.testing.assert_allclose(got, want, rtol=1e-3)
  const, state = steps(_tiny(), 3)
  np.testing.assert_allclose(const, [_tiny().lr] * 3, rtol=1e-3)
  leaves_const = jax.tree_util.tree_leaves(state)
  leaves_sched = jax.tree_util.tree_leaves(train_step.make_optimizer(cfg).init(_ADAM_PARAMS))
  assert len(leaves_sched) == len(leaves_const) + 1  # the schedule's step count


def test_lr_cosine_steps_must_not_be_negative():
  with pytest.raises(UserError, match="lr_cosine_steps"):
    config.override(config.get_config("test_tiny"), ["lr_cosine_steps=-1"])


# ----------------------------------------------------------------------------
# The convex prior's ellipse, fitted to the training images
# ----------------------------------------------------------------------------

def _ellipse_images(a, b, cy, bg, n=16, size=32):
  t = np.linspace(-1, 1, size)
  v, u = np.meshgrid(t, t, indexing="ij")
  inside = (u / a) ** 2 + ((v - cy) / b) ** 2 < 1
  rng = np.random.default_rng(0)
  img = np.broadcast_to(np.asarray(bg, np.float32), (n, size, size, 3)).copy()
  colour = rng.uniform(0.3, 0.9, (n, 1, 1, 3)).astype(np.float32)
  img = np.where(inside[None, ..., None], colour, img)
  return (img * 255).round().astype(np.uint8)


@pytest.mark.parametrize("bg", [(0, 0, 0), (1, 1, 1)])
def test_fit_prior_ellipse_recovers_a_planted_silhouette(bg):
  a, b, cx, cy = model.fit_prior_ellipse(_ellipse_images(0.5, 0.7, 0.1, bg))
  assert cx == 0.0
  assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(0.7, abs=0.05)
  assert cy == pytest.approx(0.1, abs=0.03)
  # Photos without a uniform background: the widest ellipse, not garbage.
  noise = np.random.default_rng(1).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  assert model.fit_prior_ellipse(noise)[:2] == (0.95, 0.95)


def test_convex_prior_follows_its_ellipse():
  default = model.convex_prior(32)
  np.testing.assert_array_equal(default, model.convex_prior(32, config.DEFAULT_PRIOR_ELLIPSE))
  small = model.convex_prior(32, (0.4, 0.5, 0.0, 0.2))
  assert (small < 0).mean() < 0.5 * (default < 0).mean()
  row = np.argmin(small.min(axis=1))
  assert row > 16  # centred below the middle (cy = 0.2, v down)


@pytest.mark.parametrize("text", ["0.8,0.9", "0.8,0.9,0,x", "0.01,0.9,0,0", "0.8,0.9,0,1.5"])
def test_depth_prior_ellipse_is_validated(text):
  with pytest.raises(UserError, match="depth_prior_ellipse"):
    config.override(config.get_config("test_tiny"), [f"depth_prior_ellipse={text}"])


def test_unresolved_fit_is_refused_by_the_model():
  cfg = _tiny(depth_prior=1.0, depth_prior_ellipse="fit")
  with pytest.raises(UserError, match="fitted to the training images"):
    config.prior_ellipse(cfg)
  assert config.prior_ellipse(_tiny(depth_prior_ellipse="0.5,0.6,0,0.1")) == (0.5, 0.6, 0.0, 0.1)


def test_train_fits_the_prior_once_and_resumes_with_it(tmp_path):
  from scr_jax import runner, workdir
  root = str(tmp_path / "data")
  from scr_jax import data
  data.export_synface(root, n_train=16, n_val=4, n_test=4, size=16, seed=0, verbose=False,
                      cfg=data.get_variant("morph").gen)
  wd = str(tmp_path / "w")
  cfg = runner.make_config("test_tiny", ["depth_prior=1", "depth_prior_ellipse=fit"],
                           steps=2)
  lines = []
  runner.train_run(cfg, wd, root, log=lines.append)
  saved = workdir.load_config(wd).depth_prior_ellipse
  a, b, _, _ = (float(x) for x in saved.split(","))
  assert a < 0.85 and any("ellipse fitted" in l for l in lines)  # the narrow morph faces
  # Resumed with "fit" again: the saved ellipse is used, no refit and no refusal.
  lines.clear()
  res = runner.train_run(dataclasses.replace(cfg, steps=4), wd, root, log=lines.append)
  assert res["step"] == 4 and not any("ellipse fitted" in l for l in lines)
  assert workdir.restore(wd).cfg.depth_prior_ellipse == saved


def test_fit_resolves_the_prior_for_every_caller(tmp_path):
  # train.fit itself resolves "fit" (search, reproduce and the benchmarks call
  # it directly) and returns the config it trained, which evaluates.
  from scr_jax import data, dataset, train
  from scr_jax.evaluator import Evaluator
  imgs = data.generate_split(8, 16, seed=0, split="train", cfg=data.get_variant("cat").gen)
  cfg = _tiny(depth_prior=1.0, depth_prior_ellipse="fit", steps=1, eval_every=10)
  train_data = dict(images=imgs["images"].astype(np.float32) / 255.0)
  res = train.fit_workdir(cfg, str(tmp_path / "w"), train_data, quiet=True)
  ell = config.prior_ellipse(res["cfg"])
  assert ell[3] > 0.05  # the cat heads sit below the frame's centre
  depth = Evaluator(res["nets"], res["cfg"]).depth(res["state"].params, train_data["images"][:2],
                                                    res["structure"])
  assert np.all(np.isfinite(np.asarray(depth[0] if isinstance(depth, tuple) else depth)))


def test_warmups_off_or_outside_training_are_the_free_model():
  cfg = config.get_config("cpu_small")  # trans / tilt / depth / fit warm-ups on
  assert warmup.warmups(cfg, None) == Warmups.none() == Warmups()
  assert warmup.warmups(config.get_config("paper"), jnp.int32(0)) == Warmups.none()
  w = warmup.warmups(cfg, jnp.int32(0))
  assert w.conf_hold is None and w.sym is None  # off in cpu_small
  assert [float(w.trans), float(w.tilt), float(w.depth), float(w.fit)] == [0.0] * 4
  # a pytree: it can cross jit and vmap like any argument
  assert len(jax.tree_util.tree_leaves(w)) == 4


def test_one_warmups_value_reaches_the_forward_pass_and_the_loss():
  """loss_fn at a step = forward and total_loss given warmups(cfg, step);
  the free model (no step) differs while a warm-up holds."""
  cfg = _tiny(conf_warmup_steps=4, sym_warmup_steps=4, trans_warmup_steps=4,
              tilt_warmup_steps=4, depth_warmup_steps=4)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  step = jnp.int32(1)
  got = float(train_step.loss_fn(state.params, nets, img, m, cfg, step=step)[0])
  w = warmup.warmups(cfg, step)
  out = model.forward(nets, state.params, img, m, cfg, w)
  assert got == float(losses.total_loss(out, cfg, warmups=w)[0])
  free = model.forward(nets, state.params, img, m, cfg)
  assert got != float(losses.total_loss(free, cfg)[0])
  # the view is held (translation, pitch, roll at 0) inside the forward pass
  np.testing.assert_array_equal(np.asarray(out.factors.view_Bx6)[:, [0, 2, 3, 4, 5]], 0.0)


def test_warmup_group_keeps_the_flat_names_on_disk_and_in_set():
  base = config.get_config("test_tiny")
  flat = config.override(base, ["depth_warmup_steps=300", "sym_warmup_maps=albedo"])
  grouped = config.override(base, ["warmup.depth_steps=300", "warmup.sym_maps=albedo"])
  assert flat == grouped
  assert flat.warmup == config.Warmup(depth_steps=300, sym_maps="albedo")
  assert flat.warmup.any_on() and not base.warmup.any_on()
  raw = json.loads(flat.to_json())
  assert "warmup" not in raw and raw["depth_warmup_steps"] == 300
  assert raw["sym_warmup_maps"] == "albedo"
  assert set(config.FLAT_WARMUP) <= set(raw)
  assert config.Config.from_json(flat.to_json()) == flat
  # an older config.json: flat fields, some missing (their defaults apply)
  old = dict(preset="test_tiny", image_size=16, trans_warmup_steps=200, tilt_warmup_steps=300)
  cfg = config.Config.from_json(json.dumps(old))
  assert cfg.warmup == config.Warmup(trans_steps=200, tilt_steps=300)
  # config.replace takes both forms as well
  assert config.replace(base, depth_warmup_steps=300, sym_warmup_maps="albedo") == flat
  assert config.replace(base, warmup=flat.warmup) == flat


@pytest.mark.parametrize("sets, needle", [
    (["depth_warmup_steps=-1"], "config depth_warmup_steps=-1: must be >= 0"),
    (["warmup.conf_steps=-2"], "config conf_warmup_steps=-2: must be >= 0"),
    (["warmup.depth=3"], "--set warmup.depth: unknown config field"),
    (["warmup=3"], "--set warmup: unknown config field"),
    (["tilt_warmup_steps=x"], "--set tilt_warmup_steps: expected an integer"),
])
def test_warmup_overrides_fail_in_one_line(sets, needle):
  with pytest.raises(UserError, match=re.escape(needle)):
    config.override(config.get_config("test_tiny"), sets)
  with pytest.raises(UserError, match="unknown fields: warmup"):
    config.Config.from_json(json.dumps(dict(warmup=dict(depth_steps=3))))


def test_lr_warmup_ramps_adam_steps_linearly_then_holds():
  """lr_warmup_steps=N: Adam's k-th step (a constant gradient, |m/sqrt(v)| = 1)
  is lr * min(1, (k + 1) / N); with a cosine on top, the product of both."""
  n = 4
  steps = lambda cfg, k: _adam_steps(cfg, k)[0]

  cfg = _tiny(lr_warmup_steps=n, weight_decay=0.0)
  np.testing.assert_allclose(steps(cfg, n + 2),
                             [cfg.lr * min(1.0, (k + 1) / n) for k in range(n + 2)], rtol=1e-3)
  m = 10
  cfg = _tiny(lr_warmup_steps=n, lr_cosine_steps=m, weight_decay=0.0)
  floor = train_step.LR_COSINE_FLOOR
  want = [cfg.lr * min(1.0, (k + 1) / n)
          * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(k, m) / m))) for k in range(m)]
  np.testing.assert_allclose(steps(cfg, m), want, rtol=1e-3)
  with pytest.raises(UserError, match="lr_warmup_steps"):
    config.override(config.get_config("test_tiny"), ["lr_warmup_steps=-1"])


def test_prior_warmup_fades_the_convex_prior_and_the_trained_model_has_none():
  """prior_warmup_steps=N: the prior's amplitude is depth_prior for the first
  half of N steps, then falls linearly to 0 at N; the free model (evaluation)
  of such a config has no prior, a config without the warm-up keeps it."""
  cfg = _tiny(prior_warmup_steps=10, depth_prior=0.8)
  got = [float(model.prior_amplitude(cfg, _warm(cfg, s))) for s in (0, 5, 6, 8, 10, 40)]
  np.testing.assert_allclose(got, [0.8, 0.8, 0.64, 0.32, 0, 0], atol=1e-6)
  assert model.prior_amplitude(cfg) == 0.0
  assert model.prior_amplitude(_tiny(depth_prior=0.8)) == 0.8
  assert _warm(_tiny(depth_prior=0.8), 3).prior is None
  # through the forward pass: at step 0 the depth is the prior's, in evaluation it is flat
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))  # flat initial depth
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  cam = model.camera(cfg)
  want = np.asarray(model.depth_from_raw(jnp.zeros((2, 16, 16)), cam, 0.8))
  early = model.factors(nets, state.params, img, m, cfg, _warm(cfg, 0)).depth_BxSxS
  np.testing.assert_allclose(np.asarray(early), want, atol=1e-6)
  free = np.asarray(model.factors(nets, state.params, img, m, cfg).depth_BxSxS)
  np.testing.assert_allclose(free[:, :, 2:-2], np.mean(cam.min_depth + cam.max_depth) / 2, atol=1e-6)
  # inside the jitted step the amplitude is traced: one compile serves every step
  step = train_step.make_train_step(nets, cfg)
  s1, _ = step(state, img, m)
  s2, _ = step(s1, img, m)
  assert int(s2.step) == 2


def test_light_warmup_holds_the_intensities_not_the_direction():
  """light_warmup_steps=N: ambient and diffuse are 0.5 while held (the raw
  intensities scaled by 0), free after N; the direction is never held."""
  cfg = _tiny(light_warmup_steps=10)
  raw = jnp.array([[0.8, -0.6, 0.3, -0.2], [-0.9, 0.4, -0.5, 0.1]])
  amb, dif, dxy = model.light_from_raw(raw, _warm(cfg, 3).light)
  np.testing.assert_allclose(np.asarray(amb), 0.5)
  np.testing.assert_allclose(np.asarray(dif), 0.5)
  np.testing.assert_allclose(np.asarray(dxy), np.asarray(raw[:, 2:]))
  amb, dif, _ = model.light_from_raw(raw, _warm(cfg, 8).light)  # 60 % released
  np.testing.assert_allclose(np.asarray(amb), (1 + 0.6 * raw[:, 0]) / 2, rtol=1e-6)
  free = model.light_from_raw(raw, _warm(cfg, 10).light)
  for a, b in zip(free, model.light_from_raw(raw)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert _warm(_tiny(), 0).light is None and _warm(cfg, None).light is None
  # through the forward pass: a network asking for a black render is held at 0.5
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  f = model.factors(nets, state.params, img, structure.Structure(m=jnp.zeros((4, 4))), cfg,
                    _warm(cfg, 0))
  np.testing.assert_allclose(np.asarray(f.ambient_B), 0.5)


def test_light_floor_barrier_is_zero_when_lit_and_raises_a_dark_light():
  """light_floor=f: the loss gains lam * mean(max(0, f - ambient - diffuse));
  nothing for a lit model, and its gradient raises the intensities of a dark one."""
  cfg = _tiny(light_floor=0.2, lam_light_floor=100.0)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  out = model.forward(nets, state.params, img, m, cfg)
  base, met = losses.total_loss(out, _tiny())
  lit, met = losses.total_loss(out, cfg)  # initial light ~0.5 + 0.5: above the floor
  assert float(lit) == float(base) and float(met["loss_light_floor"]) == 0.0
  f = out.factors

  def loss_of(amb):
    dark = out.replace(factors=f.replace(ambient_B=amb, diffuse_B=jnp.full_like(amb, 0.01)))
    return losses.total_loss(dark, cfg)[0] - losses.total_loss(dark, _tiny())[0]

  amb = jnp.full((2,), 0.04)
  np.testing.assert_allclose(float(loss_of(amb)), 100.0 * (0.2 - 0.05), rtol=1e-5)
  assert np.all(np.asarray(jax.grad(loss_of)(amb)) < 0)  # descent raises the light
  with pytest.raises(UserError, match="light_floor"):
    config.override(config.get_config("test_tiny"), ["light_floor=-0.1"])


def _planted_scene(size=32):
  """A convex ellipsoid face with a symmetric random albedo (factors, camera)."""
  cfg = config.replace(config.get_config("cpu_small"), image_size=size)
  cam = model.camera(cfg)
  depth = model.depth_from_raw(jnp.asarray(model.convex_prior(size))[None], cam)
  a = np.random.default_rng(0).uniform(0.2, 0.9, (1, size, size, 3)).astype(np.float32)
  albedo = jnp.asarray((a + a[:, :, ::-1]) / 2) * 2 - 1
  return depth, albedo, cam


@pytest.mark.parametrize("view,amb,dif,dxy", [
    ((0, 0, 0, 0, 0, 0), 0.4, 0.6, (0.3, -0.2)),
    ((0.1, -0.5, 0.05, 0.02, 0, 0), 0.3, 0.7, (-0.8, 0.4))])
def test_fit_light_recovers_the_light_an_image_was_rendered_with(view, amb, dif, dxy):
  """light_fit: rendered from known factors, the image gives back its light
  (frontal: exact; 29 degrees of yaw: up to bilinear resampling), whatever the
  network predicted (here 0.5 / 0.5 from the front)."""
  depth, albedo, cam = _planted_scene()
  f = model.Factors(depth, albedo, jnp.array([amb]), jnp.array([dif]),
                    jnp.array([dxy], jnp.float32), jnp.array([view], jnp.float32))
  x = model.render_factors(f, cam)[0].recon_im_BxSxSx3
  guess = f.replace(ambient_B=jnp.array([0.5]), diffuse_B=jnp.array([0.5]),
                    light_dxy_Bx2=jnp.zeros((1, 2)))
  got = model.fit_light(guess, x, cam, 1e-4)
  tol = 2e-3 if not any(view) else 1.5e-2
  np.testing.assert_allclose(float(got.ambient_B[0]), amb, atol=tol)
  np.testing.assert_allclose(float(got.diffuse_B[0]), dif, atol=tol)
  np.testing.assert_allclose(np.asarray(got.light_dxy_Bx2[0]), dxy, atol=3 * tol)
  # rendering the guess with the fit on reproduces the image
  orig, _, fitted = model.render_factors(guess, cam, x, 1e-4)
  assert float(jnp.mean(jnp.abs(orig.recon_im_BxSxSx3 - x))) < 0.01
  assert float(jnp.mean(jnp.abs(model.render_factors(guess, cam)[0].recon_im_BxSxSx3 - x))) > 0.05
  np.testing.assert_allclose(np.asarray(fitted.ambient_B), np.asarray(got.ambient_B), atol=1e-6)


def test_fit_light_ridge_pulls_towards_the_network_light_and_passes_gradients():
  """A large ridge returns the network's light; the fitted light has a
  gradient wrt the depth (variable projection) and wrt the network's light."""
  depth, albedo, cam = _planted_scene(16)
  f = model.Factors(depth, albedo, jnp.array([0.4]), jnp.array([0.6]),
                    jnp.array([[0.3, -0.2]], jnp.float32), jnp.zeros((1, 6)))
  x = model.render_factors(f, cam)[0].recon_im_BxSxSx3
  guess = f.replace(ambient_B=jnp.array([0.7]), diffuse_B=jnp.array([0.2]),
                    light_dxy_Bx2=jnp.array([[-0.5, 0.5]]))
  far = model.fit_light(guess, x, cam, 1e6)
  np.testing.assert_allclose(float(far.ambient_B[0]), 0.7, atol=1e-4)
  np.testing.assert_allclose(float(far.diffuse_B[0]), 0.2, atol=1e-4)
  np.testing.assert_allclose(np.asarray(far.light_dxy_Bx2[0]), [-0.5, 0.5], atol=1e-3)
  amb_of = lambda d, a0: model.fit_light(guess.replace(depth_BxSxS=d, ambient_B=a0), x, cam,
                                         1e-2).diffuse_B[0]
  gd, ga = jax.grad(amb_of, argnums=(0, 1))(depth, guess.ambient_B)
  assert float(jnp.abs(gd).sum()) > 0 and float(jnp.abs(ga).sum()) > 0


def test_light_fit_reaches_the_forward_pass_and_factors():
  """Config.light_fit > 0: forward's and factors()'s light is the fitted one
  (the same), not the network's; 0 (default) leaves both the network's."""
  cfg = _tiny(light_fit=0.01)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  fit = model.forward(nets, state.params, img, m, cfg).factors
  net = model.forward(nets, state.params, img, m, _tiny()).factors
  assert not np.allclose(np.asarray(fit.light_dxy_Bx2), np.asarray(net.light_dxy_Bx2))
  got = model.factors(nets, state.params, img, m, cfg)
  np.testing.assert_allclose(np.asarray(got.ambient_B), np.asarray(fit.ambient_B), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.light_dxy_Bx2), np.asarray(fit.light_dxy_Bx2),
                             atol=1e-4)
  with pytest.raises(UserError, match="light_fit"):
    config.override(config.get_config("test_tiny"), ["light_fit=-1"])


def test_fit_warmup_starts_from_the_network_light_and_ends_at_the_fit():
  """fit_warmup_steps=N: the network's light for the first half, the fitted
  one from step N on (and in the free model)."""
  cfg = _tiny(light_fit=0.01, fit_warmup_steps=10)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  light = lambda c, s: model.forward(nets, state.params, img, m, c, _warm(c, s)).factors.ambient_B
  net, fit = light(_tiny(), None), light(cfg, None)
  np.testing.assert_allclose(np.asarray(light(cfg, 3)), np.asarray(net), atol=1e-6)
  np.testing.assert_allclose(np.asarray(light(cfg, 10)), np.asarray(fit), atol=1e-5)
  mid = np.asarray(light(cfg, 8))  # 60 % of the way from the network's to the fit
  np.testing.assert_allclose(mid, np.asarray(net) + 0.6 * (np.asarray(fit) - np.asarray(net)),
                             atol=1e-4)
