"""Pipeline: loss, symmetry flip, parameter parity, training, checkpoint/resume,
multi-device equivalence. Tiny sizes (preset test_tiny, 16x16)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from scr_jax import config, data, losses, model, nets as nets_lib, parallel, structure, train, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "experiments", "run.py")]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synface"))
  data.export_synface(root, n_train=24, n_val=8, n_test=8, size=16, seed=3, verbose=False)
  cfg = config.get_config("test_tiny")
  return root, data.load_synface(root, "train", 16), data.load_synface(root, "val", 16), cfg


def test_photometric_hand_computed():
  recon = jnp.zeros((1, 2, 2, 1))
  target = jnp.array([[[[1.0], [2.0]], [[0.0], [5.0]]]])
  mask = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
  sigma = jnp.array([[[1.0, 2.0], [0.5, 1.0]]])
  got = losses.photometric(recon, target, mask, sigma)
  r2 = np.sqrt(2.0)
  want = ((r2 * 1 / 1 + np.log(1)) + (r2 * 2 / 2 + np.log(2)) + (0 + np.log(0.5))) / 3
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_flip_twin_of_symmetric_factors_is_identical():
  cfg = config.get_config("test_tiny")
  cam = model.camera(cfg)
  rng = np.random.default_rng(0)
  half = rng.uniform(0.95, 1.05, (2, 16, 8)).astype(np.float32)
  depth = np.concatenate([half, half[:, :, ::-1]], 2)
  alb_half = rng.uniform(-1, 1, (2, 16, 8, 3)).astype(np.float32)
  albedo = np.concatenate([alb_half, alb_half[:, :, ::-1]], 2)
  f = model.Factors(depth_BxSxS=jnp.asarray(depth), albedo_BxSxSx3=jnp.asarray(albedo),
                    ambient_B=jnp.full(2, 0.5), diffuse_B=jnp.full(2, 0.5),
                    light_dxy_Bx2=jnp.asarray([[0.0, 0.0], [0.0, 0.3]]),
                    view_Bx6=jnp.asarray([[0, 0.3, 0, 0, 0, 0], [0.1, -0.2, 0, 0, 0, 0]],
                                         jnp.float32))
  orig, flip = jax.jit(model.render_factors, static_argnums=1)(f, cam)
  np.testing.assert_allclose(orig.recon_im_BxSxSx3, flip.recon_im_BxSxSx3, atol=1e-5)
  # an asymmetric depth makes the twins differ
  f2 = f.replace(depth_BxSxS=jnp.asarray(depth) + jnp.linspace(0, 0.05, 16)[None, None])
  orig2, flip2 = jax.jit(model.render_factors, static_argnums=1)(f2, cam)
  assert float(jnp.abs(orig2.recon_im_BxSxSx3 - flip2.recon_im_BxSxSx3).max()) > 1e-3
  # the flipped canonical depth is the mirror image
  np.testing.assert_array_equal(flip2.canon_depth_BxSxS, orig2.canon_depth_BxSxS[:, :, ::-1])


def test_depth_head_range_and_border():
  cam = model.camera(config.get_config("test_tiny"))
  raw = jnp.asarray(np.random.default_rng(1).normal(0, 3, (2, 16, 16)).astype(np.float32))
  d = model.depth_from_raw(raw, cam)
  assert float(d.min()) >= cam.min_depth - 1e-6 and float(d.max()) <= cam.max_depth + 1e-6
  np.testing.assert_allclose(d[:, :, :2], cam.border_depth)
  np.testing.assert_allclose(d[:, :, -2:], cam.border_depth)


def test_parameter_counts_match_unsup3d_paper_preset():
  cfg = config.get_config("paper")
  nets = nets_lib.make_nets(cfg)
  params = jax.eval_shape(nets.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  c = nets_lib.param_counts(params)
  # Unsup3D: ~37M in all; D and A ~13M each, confidence ~7.7M, V and L ~1.7M each.
  assert 36e6 < c["total"] < 38.5e6
  assert 12.5e6 < c["f1_D"] + c["f2_D"] < 13.5e6
  assert 1.6e6 < c["f1_V"] + c["f2_V"] < 1.8e6
  assert 7.5e6 < c["conf"] < 8.0e6


@pytest.mark.parametrize("strides,hw", [(2, 5), (1, 1)])
def test_conv_transpose_equals_flax(strides, hw):
  """Our dilation-free transposed conv = flax's nn.ConvTranspose on the same
  parameters (outputs and both gradients), so checkpoints carry over."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, hw, hw + 1 if strides == 2 else hw, 6))
  ref = nn.ConvTranspose(7, (4, 4), (strides, strides), use_bias=False,
                         padding="SAME" if strides == 2 else "VALID")
  ours = nets_lib.ConvTranspose(7, strides)
  p_ref = ref.init(jax.random.PRNGKey(1), x)
  p_ours = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_ours)
  np.testing.assert_array_equal(p_ref["params"]["kernel"], p_ours["params"]["kernel"])
  y_ref, y = ref.apply(p_ref, x), ours.apply(p_ref, x)
  want = (2, 4, 4, 7) if strides == 1 else (2, 2 * hw, 2 * hw + 2, 7)
  assert y.shape == y_ref.shape == want
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  w = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  grad = lambda mod: jax.grad(lambda p, x: jnp.sum(mod.apply(p, x) * w), argnums=(0, 1))(p_ref, x)
  for a, b in zip(jax.tree_util.tree_leaves(grad(ours)), jax.tree_util.tree_leaves(grad(ref))):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cin,cout,k,stride,pad", [(5, 8, 3, 1, 1), (5, 32, 3, 1, 1), (3, 36, 4, 2, 1),
                                                    (5, 8, 4, 2, 1), (6, 40, 4, 1, 0)])
def test_conv_equals_flax_first_and_second_order(cin, cout, k, stride, pad):
  """nets.Conv (custom kernel gradient for >= 32 outputs) = nn.Conv: values,
  gradients, and the grad-of-grad that the unrolled structure search takes."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, cin))
  ref = nn.Conv(cout, (k, k), (stride, stride), padding=pad, use_bias=False)
  ours = nets_lib.Conv(cout, k, stride, pad)
  p = ref.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(p["params"]["kernel"],
                                ours.init(jax.random.PRNGKey(1), x)["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=1e-5)
  w = jax.random.normal(jax.random.PRNGKey(2), ref.apply(p, x).shape)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.tanh(mod.apply(p, x)) * w)
  for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss(ours), (0, 1))(p, x)),
                  jax.tree_util.tree_leaves(jax.grad(loss(ref), (0, 1))(p, x))):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # Second order: d/dx of |dL/dk|^2 (as in a hypergradient through an update).
  meta = lambda mod: jax.grad(lambda x: sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(
      jax.grad(loss(mod))(p, x))))(x)
  np.testing.assert_allclose(meta(ours), meta(ref), rtol=1e-3, atol=1e-3)


def test_forward_contract():
  """model.forward's typed output: every field's shape, its range, the input
  converted once ([0, 1] -> [-1, 1]), the flipped twin's canonical depth the
  mirror image of the original's, and the same values with and without jit."""
  cfg = config.get_config("test_tiny")
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  b, s = 3, cfg.image_size
  img = jax.random.uniform(jax.random.PRNGKey(4), (b, s, s, 3))
  st = structure.Structure(m=jnp.asarray(structure.dense_matrix("DVAL")), q="cosine")
  out = model.forward(nets, state.params, img, st, cfg)
  f = out.factors
  want = dict(depth_BxSxS=(b, s, s), albedo_BxSxSx3=(b, s, s, 3), ambient_B=(b,),
              diffuse_B=(b,), light_dxy_Bx2=(b, 2), view_Bx6=(b, 6),
              u_Bx4xd=(b, 4, cfg.embed_dim), adjacency=(b, 4, 4))
  assert {k: getattr(f, k).shape for k in want} == want
  for r in (out.orig, out.flip):
    assert r.canon_depth_BxSxS.shape == r.recon_depth_BxSxS.shape == (b, s, s)
    assert r.canon_shading_BxSxS.shape == r.recon_mask_BxSxS.shape == (b, s, s)
    for a in (r.canon_im_BxSxSx3, r.canon_normal_BxSxSx3, r.recon_im_BxSxSx3):
      assert a.shape == (b, s, s, 3)
    assert set(np.unique(np.asarray(r.recon_mask_BxSxS))) <= {0.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(r.canon_normal_BxSxSx3, axis=-1), 1.0, atol=1e-5)
  assert out.sigma_l1_BxSxSx2.shape == (b, s, s, 2)
  assert out.sigma_perc_BxTxTx2.shape == (b, s // 4, s // 4, 2)
  assert float(out.sigma_l1_BxSxSx2.min()) > 0 and float(out.sigma_perc_BxTxTx2.min()) > 0
  np.testing.assert_array_equal(out.input_BxSxSx3, img * 2 - 1)
  np.testing.assert_allclose(model.to_unit_range(out.input_BxSxSx3), img, atol=1e-6)
  assert float(jnp.abs(f.albedo_BxSxSx3).max()) <= 1.0
  for a in (f.ambient_B, f.diffuse_B):
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
  assert cfg.min_depth <= float(f.depth_BxSxS.min()) and float(f.depth_BxSxS.max()) <= cfg.max_depth
  np.testing.assert_array_equal(out.flip.canon_depth_BxSxS, out.orig.canon_depth_BxSxS[:, :, ::-1])
  np.testing.assert_array_equal(out.orig.canon_depth_BxSxS, f.depth_BxSxS)
  # the dynamic adjacency: q(u) * M_dense, zero where M_dense is
  assert float(jnp.abs(f.adjacency * (1 - st.m)).max()) == 0.0
  jitted = structure.jit(lambda p, x, s_: model.forward(nets, p, x, s_, cfg))(
      state.params, img, st)
  for a, j in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(j), rtol=1e-4, atol=1e-5)


def test_train_step_takes_another_objective():
  """make_train_step(nets, cfg, objective): the same step (optimiser, step
  counter) on another loss and batch, e.g. reproduce's supervised baseline;
  equal to the optimiser applied by hand."""
  import optax
  cfg = config.get_config("test_tiny")
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jax.random.uniform(jax.random.PRNGKey(1), (cfg.batch_size, 16, 16, 3))
  gt = jnp.full((cfg.batch_size, 16, 16), 1.02)
  st = structure.Structure(m=jnp.zeros((4, 4)))

  def objective(p, batch, structure_, step):
    x, z = batch
    loss = jnp.mean(jnp.abs(model.factors(nets, p, x, structure_, cfg).depth_BxSxS - z))
    return loss, dict(loss=loss)

  opt = train_step.make_optimizer(cfg)
  p, s = state.params, state.opt_state
  for _ in range(2):
    g = jax.grad(lambda q: objective(q, (img, gt), st, None)[0])(p)
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
  step = train_step.make_train_step(nets, cfg, objective)
  new = jax.tree_util.tree_map(jnp.copy, state)
  for _ in range(2):
    new, met = step(new, (img, gt), st)
  assert int(new.step) == 2 and bool(met["finite"])
  for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(new.params),
      jax.tree_util.tree_leaves(state.params))) > 1e-6  # it did train


def test_train_state_contract():
  # One flax TrainState: the optimiser is built once (the state's tx is the
  # config's), a step keeps the type and advances the scalar step, and a
  # checkpoint holds exactly {params, opt_state, step}.
  cfg = config.get_config("test_tiny")
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  assert isinstance(state, train_step.TrainState)
  assert state.tx is train_step.make_optimizer(cfg) and state.apply_fn == nets.apply
  img = jax.random.uniform(jax.random.PRNGKey(1), (cfg.batch_size, 16, 16, 3))
  none = structure.Structure(m=jnp.zeros((4, 4), jnp.float32))
  new, _ = train_step.make_train_step(nets, cfg)(jax.tree_util.tree_map(jnp.copy, state), img,
                                                 none)
  assert isinstance(new, train_step.TrainState) and int(new.step) == 1 and new.step.shape == ()
  assert sorted(new.tree()) == ["opt_state", "params", "step"]
  back = state.with_tree(jax.tree_util.tree_map(np.asarray, new.tree()))
  assert int(back.step) == 1 and back.tx is state.tx
  stacked = train_step.stack_state(state, 3)
  assert stacked.step.shape == () and all(
      x.shape[0] == 3 for x in jax.tree_util.tree_leaves((stacked.params, stacked.opt_state)))


def test_structure_labels_do_not_recompile():
  """structure.jit: structures that differ only in labels (variant, orders)
  share one compiled program; q is part of the program."""
  traces = []
  fn = structure.jit(lambda s_: traces.append(s_.variant) or s_.m * 2)
  m = jnp.ones((4, 4))
  fn(structure.Structure(m=m, variant="dense"))
  fn(structure.Structure(m=m, variant="generic"))
  fn(structure.candidates(["DVAL", "VDLA"]).candidate(1))
  assert traces == [None]  # traced once, without labels
  fn(structure.Structure(m=m, q="cosine"))
  assert len(traces) == 2


def test_structure_enters_as_data(tiny_data):
  """Every variant runs the same params; M changes the output only when it has
  edges; a batch of per-image M works too."""
  _, tr, _, cfg = tiny_data
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  img = jnp.asarray(tr["images"][:4])
  fwd = jax.jit(lambda p, m: model.factors(nets, p, img, structure.Structure(m=m),
                                           cfg).albedo_BxSxSx3)
  zero = fwd(state.params, jnp.zeros((4, 4)))
  dense = fwd(state.params, jnp.asarray(structure.dense_matrix("DVAL")))
  per_image = fwd(state.params, jnp.broadcast_to(jnp.asarray(structure.dense_matrix("DVAL")), (4, 4, 4)))
  assert float(jnp.abs(zero - dense).max()) > 1e-6
  np.testing.assert_allclose(dense, per_image, atol=1e-6)


def _params_close(a, b, atol=0.0):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  return all(np.allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0) for x, y in zip(la, lb))


def test_tiny_training_lowers_loss(tiny_data, tmp_path):
  _, tr, va, cfg = tiny_data
  cfg = dataclasses.replace(cfg, steps=40, lr=1e-3, log_every=40, eval_every=1000,
                            ckpt_every=1000)
  nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
  step = train_step.make_train_step(nets, cfg)
  m = structure.Structure(m=jnp.zeros((4, 4)))
  idx = train.batch_indices(24, cfg.batch_size, 0, 0)
  fixed = jnp.asarray(tr["images"][idx])
  before = float(train_step.loss_fn(state.params, nets, fixed, m, cfg)[0])
  for i in range(cfg.steps):
    img = jnp.asarray(tr["images"][train.batch_indices(24, cfg.batch_size, 0, i)])
    state, met = step(state, img, m)
    assert bool(met["finite"])
  after = float(train_step.loss_fn(state.params, nets, fixed, m, cfg)[0])
  assert after < before - 0.05, (before, after)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
  """Stopping after a checkpoint and resuming gives bit-identical params."""
  _, tr, _, cfg = tiny_data
  cfg = dataclasses.replace(cfg, steps=4, ckpt_every=2, eval_every=1000)
  full = train.fit_workdir(cfg, str(tmp_path / "full"), tr, quiet=True)
  half = train.fit_workdir(dataclasses.replace(cfg, steps=2), str(tmp_path / "split"), tr, quiet=True)
  assert half["step"] == 2
  rest = train.fit_workdir(cfg, str(tmp_path / "split"), tr, quiet=True)
  assert rest["start_step"] == 2 and rest["step"] == 4
  assert _params_close(full["state"].params, rest["state"].params)
  assert not _params_close(full["state"].params, half["state"].params)
  # the workdir holds what a user expects
  for f in ("config.json", "metrics.csv", "checkpoints", "tb"):
    assert os.path.exists(tmp_path / "full" / f), f
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "full" / "tb"))


def test_sigkill_then_resume_cli(tiny_data, tmp_path):
  """SIGKILL a training process after its first checkpoint, rerun the same
  command: it resumes and ends with the params of an uninterrupted run."""
  root, tr, _, cfg = tiny_data
  steps = 8
  args = ["train", "--preset", "test_tiny", "--data", root, "--steps", str(steps),
          "--set", "ckpt_every=2", "--set", "eval_every=1000"]
  wd_kill = str(tmp_path / "kill")
  proc = subprocess.Popen(RUN + args + ["--workdir", wd_kill], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, cwd=ROOT)
  ckdir = os.path.join(wd_kill, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckdir) and any(n.isdigit() for n in os.listdir(ckdir)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = subprocess.run(RUN + args + ["--workdir", wd_kill], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "resuming" in done.stdout + done.stderr or proc.returncode == 0
  full = train.fit_workdir(dataclasses.replace(cfg, steps=steps, ckpt_every=2, eval_every=1000),
                   str(tmp_path / "ref"), tr, quiet=True)
  from scr_jax import checkpoint
  nets, like = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
  got = checkpoint.restore_latest(checkpoint.manager(wd_kill), like.tree())
  assert int(got["step"]) == steps
  assert _params_close(full["state"].params, got["params"])


# Three steps of test_tiny on the built-in batches (shared by the two scripts
# below; %r = the data folder, %s = what "n" reports).
_THREE_STEPS = r"""
import jax.numpy as jnp
from scr_jax import config, data, parallel, structure, train, train_step
cfg = config.get_config("test_tiny")
d = data.load_synface(%r, "train", 16)
nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
mesh = parallel.data_mesh()
parallel.barrier("start")  # the processes' compile times differ by more than gloo's 30 s
state = parallel.replicate(state, mesh)
m = parallel.replicate(structure.Structure(m=jnp.zeros((4, 4))), mesh)
img0 = parallel.shard_batch(d["images"][train.batch_indices(24, cfg.batch_size, 0, 0)], mesh)
step = parallel.compile_in_step(train_step.make_train_step(nets, cfg), state, img0, m)
losses = []
for i in range(3):
  img = parallel.shard_batch(d["images"][train.batch_indices(24, cfg.batch_size, 0, i)], mesh)
  state, met = step(state, img, m)
  losses.append(float(met["loss"]))
print(json.dumps(dict(n=%s, losses=losses)))
"""

MULTI = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d"
import jax
""" + _THREE_STEPS.replace("%s", "len(jax.devices())")


def test_multi_device_matches_single(tiny_data):
  root = tiny_data[0]
  res = {}
  for n in (1, 4):
    out = subprocess.run([sys.executable, "-c", MULTI % (n, root)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    res[n] = json.loads(out.stdout.strip().splitlines()[-1])
  assert res[4]["n"] == 4 and res[1]["n"] == 1
  np.testing.assert_allclose(res[4]["losses"], res[1]["losses"], rtol=1e-4)


def test_perceptual_loss_with_a_converted_file(tmp_path):
  from scr_jax import perceptual
  rng = np.random.default_rng(0)
  chans = dict(conv1_1=(3, 8), conv1_2=(8, 8), conv2_1=(8, 8), conv2_2=(8, 8),
               conv3_1=(8, 8), conv3_2=(8, 8), conv3_3=(8, 8))
  arrays = {}
  for k, (ci, co) in chans.items():
    arrays[k + "/kernel"] = rng.normal(0, 0.3, (3, 3, ci, co)).astype(np.float32)
    arrays[k + "/bias"] = np.zeros(co, np.float32)
  path = str(tmp_path / "vgg.npz")
  np.savez(path, **arrays)
  vgg = perceptual.load_vgg(path)
  img = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32))
  f = perceptual.features(vgg, img * 2 - 1)
  assert f.shape == (2, 4, 4, 8)
  mask = jnp.ones((2, 16, 16))
  sigma = jnp.full((2, 4, 4), 0.5)
  # identical features: only the log(sigma) term remains
  np.testing.assert_allclose(float(perceptual.confidence_loss(f, f, mask, sigma)), np.log(0.5),
                             rtol=1e-5)
  fn = perceptual.make_perceptual_fn(vgg)
  render = lambda x: model.Rendering(*([None] * 6), recon_im_BxSxSx3=x)
  out = model.ForwardOutput(factors=None, orig=render(img * 2 - 1),
                            flip=render(jnp.zeros_like(img)), sigma_l1_BxSxSx2=None,
                            sigma_perc_BxTxTx2=jnp.full((2, 4, 4, 2), 0.5),
                            input_BxSxSx3=model.to_model_range(img))
  lp, lp_flip = fn(out, mask)
  np.testing.assert_allclose(float(lp), np.log(0.5), rtol=1e-5)
  assert float(lp_flip) > float(lp) + 1e-3
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, x=np.zeros(3))
  with pytest.raises(Exception) as e:
    perceptual.load_vgg(bad)
  assert "VGG16" in str(e.value)


def test_depth_prior_starts_convex_and_min_sigma_floors_confidence():
  cam = model.camera(config.get_config("test_tiny"))
  d = np.asarray(model.depth_from_raw(jnp.zeros((1, 16, 16)), cam, prior=1.0))[0]
  assert d[8, 8] < d[8, 4] < cam.border_depth  # nearer in the middle
  np.testing.assert_allclose(d[8, 3:13], d[8, 3:13][::-1], atol=1e-6)  # symmetric
  flat = np.asarray(model.depth_from_raw(jnp.zeros((1, 16, 16)), cam, prior=0.0))[0]
  np.testing.assert_allclose(flat[:, 2:-2], (cam.min_depth + cam.max_depth) / 2, atol=1e-6)
  # a floor on sigma bounds the loss from below where reconstruction is perfect
  cfg = dataclasses.replace(config.get_config("test_tiny"), min_sigma=0.05)
  img = jnp.zeros((1, 4, 4, 3))
  half = model.Rendering(*([None] * 5), recon_mask_BxSxS=jnp.ones((1, 4, 4)),
                         recon_im_BxSxSx3=jnp.full((1, 4, 4, 3), -1.0))
  out = model.ForwardOutput(factors=None, orig=half, flip=half,
                            sigma_l1_BxSxSx2=jnp.zeros((1, 4, 4, 2)), sigma_perc_BxTxTx2=None,
                            input_BxSxSx3=model.to_model_range(img))
  loss, _ = losses.total_loss(out, cfg)
  np.testing.assert_allclose(float(loss), (1 + cfg.lam_flip) * np.log(0.05), rtol=1e-4)


DIST = r"""
import os, sys, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:%d", num_processes=2, process_id=%d)
""" + _THREE_STEPS.replace("%s", "jax.process_count()")


def test_two_process_distributed_matches_single(tiny_data):
  """jax.distributed with 2 CPU processes on localhost (gloo collectives):
  the same global batches give the same losses as one process."""
  import socket
  root = tiny_data[0]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", DIST % (port, i, root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  single = subprocess.run([sys.executable, "-c", MULTI % (1, root)], capture_output=True,
                          text=True, timeout=300, env=env)
  assert single.returncode == 0, single.stderr[-2000:]
  ref = json.loads(single.stdout.strip().splitlines()[-1])
  assert res[0]["n"] == 2
  np.testing.assert_allclose(res[0]["losses"], ref["losses"], rtol=1e-4)
  np.testing.assert_allclose(res[1]["losses"], ref["losses"], rtol=1e-4)


def test_lr_view_mult_scales_only_the_view_updates():
  base = config.get_config("test_tiny")
  img = jax.random.uniform(jax.random.PRNGKey(5), (4, 16, 16, 3))
  m = structure.Structure(m=jnp.zeros((4, 4)))
  deltas = []
  for mult in (1.0, 3.0):
    cfg = config.override(base, [f"lr_view_mult={mult}"])
    nets, state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    new, _ = train_step.make_train_step(nets, cfg)(state, img, m)
    deltas.append(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, new.params, before))
  for name in deltas[0]["params"]:
    want = 3.0 if name in ("f1_V", "f2_V") else 1.0
    for a, b in zip(jax.tree_util.tree_leaves(deltas[0]["params"][name]),
                    jax.tree_util.tree_leaves(deltas[1]["params"][name])):
      np.testing.assert_allclose(b, want * a, rtol=1e-4, atol=1e-7)
