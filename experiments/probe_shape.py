"""Where each image's own shape is lost: two probes on a generated variant's ground truth.

    python experiments/probe_shape.py signal [--variants default,morph,...]
    python experiments/probe_shape.py capacity [--variants default] [--steps 2000]
        [--seed 0] [--set nf_ed=32 ...]
    python experiments/probe_shape.py sign [--variants default,morph,...] [--images 150]

signal (no training): how much the photometric loss rewards each image's own canonical
  depth over the template (the train split's mean canonical depth), next to what it
  rewards for the view and the light. In the canonical frame, on the object's pixels
  (canon_mask), images in [0, 1], the loss of Unsup3D without confidence: L1 of the
  image plus 0.5 x L1 of the flipped twin (depth and albedo mirrored, same light).
  Rows: the truth; the template with the true albedo; the template with the albedo
  re-fitted, symmetric (sym(image / shading), what the model's albedo can absorb); the
  truth's depth with the same re-fit; and, as yardsticks, a 2-degree yaw error (in
  the image, on the pixels both renderings cover) and the light direction turned by 10
  degrees about the vertical axis.
  The per-image shape signal is (template re-fit) - (truth re-fit).

capacity: the model's own depth path (`nets.EDEncoder` + `nets.EDDecoder` +
  `model.depth_from_raw` with the preset's convex prior), trained on the TRUE canonical
  depth (L1 on canon_mask; the preset's optimiser: Adam at its lr with its weight decay,
  coupled as Unsup3D's unless weight_decay_mode=decoupled; its batch): can the 32 px
  network represent each image's shape at this budget at all? At a few steps it prints
  the test split's per-image shape correlation (`diagnostics.shape_residual_corr`,
  median) and the MAD of its canonical depth rendered into the TRUE view, beside the
  template's (`evaluator.template_depth_baseline`). With --normals the objective adds
  the normals' mean (1 - cos), the quantity MAD measures. A capacity-limited network stays
  near the template; an unsupervised model cannot be expected to do better than this.

sign (no training): does the shape a depth warm-up holds early carry the yaw's sign?
  The true canonical albedo (made symmetric) on a scaffold depth (the convex prior at
  amplitudes 1, 0.5, 0.25; the prior's ellipse fitted to the train images; a flat plane
  at the rotation centre; the train split's mean canonical depth), lit by the true light
  or a frontal one, rendered with the model's renderer at the true view and at the view
  mirrored (yaw, roll and x shift negated: the convex/concave twin's pose); per row, the
  fraction of images whose true pose renders the image better (L1 over the frame, images
  in [0, 1]) and the mean L1 difference (mirrored - true; > 0: the batch's gradient
  favours the true sign). Near 0.5 the scaffold does not decide the sign; below, it
  favours the mirrored pose.

Data: `data/builtin_<variant>_s<size>_seed0` (generated once, as bench_quality.py does).
"""
import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from scr_jax import (cliutil, config, data, dataset, diagnostics, evaluator, model,  # noqa: E402
                     nets as nets_lib, render, runner)
from scr_jax.errors import UserError  # noqa: E402


def _load(variant, cfg):
  size = data.get_variant(variant).export_size or cfg.image_size
  root = dataset.ensure_builtin(size, 0, variant)
  out = {}
  for split in ("train", "test"):
    d = dataset.load_split(root, split, cfg)
    if "gt" not in d:
      raise UserError(f"{root}/{split}: no ground-truth sidecar")
    out[split] = d
  return out


# ----------------------------------------------------------------------------
# signal
# ----------------------------------------------------------------------------

def _shading(depth_NxSxS, light_Nx4, cam):
  normal = jax.vmap(lambda d: render.depth_to_normals(d, cam))(jnp.asarray(depth_NxSxS))
  light = jnp.asarray(light_Nx4)
  return np.asarray(jax.vmap(render.shade)(normal, light[:, 0], light[:, 1], light[:, 2:4]))


def _l1(a_NxSxSx3, b_NxSxSx3, mask_NxSxS):
  m = mask_NxSxS[..., None].astype(np.float64)
  return np.sum(np.abs(a_NxSxSx3 - b_NxSxSx3) * m, axis=(1, 2, 3)) / np.maximum(
      3 * m.sum(axis=(1, 2, 3)), 1.0)


def _loss(depth, albedo, light, target, mask, cam):
  """L1 of albedo x shading(depth) against target, plus 0.5 x its flipped twin's."""
  own = _l1(albedo * _shading(depth, light, cam)[..., None], target, mask)
  flip = _l1(albedo[:, :, ::-1] * _shading(depth[:, :, ::-1], light, cam)[..., None], target, mask)
  return own + 0.5 * flip


def _refit_albedo(depth, light, target, cam):
  """The symmetric albedo that best explains target under depth's shading."""
  a = target / np.maximum(_shading(depth, light, cam)[..., None], 1e-3)
  return np.clip(0.5 * (a + a[:, :, ::-1]), 0.0, 1.0)


def _rotate_light(light_Nx4, deg):
  """The light direction turned by `deg` about the vertical axis (ambient / diffuse kept)."""
  d = np.concatenate([light_Nx4[:, 2:4], np.ones((len(light_Nx4), 1))], 1)
  c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
  x, z = c * d[:, 0] + s * d[:, 2], -s * d[:, 0] + c * d[:, 2]
  out = light_Nx4.copy()
  out[:, 2], out[:, 3] = x / z, d[:, 1] / z
  return out


def signal_rows(depth, albedo, light, mask, view, tmpl, image_depth, cam) -> dict:
  """{row: per-image loss (N floats)} of the `signal` probe: canonical depth
  NxSxS (metric), albedo NxSxSx3 in [0, 1], light Nx4, canon_mask NxSxS,
  view Nx6 (radians), template SxS, image_depth NxSxS (the image-frame truth,
  for the object's pixels of the yaw yardstick)."""
  tmpl = np.broadcast_to(tmpl, depth.shape)
  target = albedo * _shading(depth, light, cam)[..., None]  # the true canonical image
  rows = {
      "truth (true albedo)": _loss(depth, albedo, light, target, mask, cam),
      "template, true albedo": _loss(tmpl, albedo, light, target, mask, cam),
      "template, albedo re-fit (symmetric)": _loss(
          tmpl, _refit_albedo(tmpl, light, target, cam), light, target, mask, cam),
      "truth's depth, albedo re-fit (symmetric)": _loss(
          depth, _refit_albedo(depth, light, target, cam), light, target, mask, cam),
      LIGHT: _loss(
          depth, albedo, _rotate_light(light, 10.0), target, mask, cam),
  }
  # A 2-degree yaw error, in the image: both renderings of the true canonical image.
  canon = jnp.asarray(model.to_model_range(target), jnp.float32)
  off = np.array(view, np.float32)
  off[:, 1] += np.deg2rad(2.0)
  _, im0, cov0 = render.render_views(jnp.asarray(depth), canon, jnp.asarray(view), cam)
  _, im1, cov1 = render.render_views(jnp.asarray(depth), canon, jnp.asarray(off), cam)
  both = np.asarray(cov0 & cov1) & (np.asarray(image_depth) < cam.max_depth - 1e-3)
  rows[YAW] = _l1(np.asarray(model.to_unit_range(im0)), np.asarray(model.to_unit_range(im1)), both)
  return rows


YAW = "yaw 2 deg off (in the image)"
LIGHT = "light turned 10 deg about the vertical axis (true depth, albedo)"
REFIT = "template, albedo re-fit (symmetric)"
REFIT_TRUTH = "truth's depth, albedo re-fit (symmetric)"


def signal(variant, cfg, n):
  cam = model.camera(cfg)
  d = _load(variant, cfg)
  gt, tr = d["test"]["gt"], d["train"]["gt"]
  depth, albedo, light, mask, view = (np.asarray(gt[k][:n]) for k in
                                      ("canon_depth", "canon_albedo", "light", "canon_mask", "view"))
  rows = signal_rows(depth, albedo, light, mask, view, np.mean(tr["canon_depth"], 0),
                     d["test"]["depth"][:n], cam)
  print(f"\n### signal: {variant} (test split, {len(depth)} images; L1 in [0, 1] units, "
        "median and quartiles over images)\n")
  print("| rendering | median | q25 | q75 |\n|---|---|---|---|")
  for k, v in rows.items():
    print(f"| {k} | {np.median(v):.4f} | {np.quantile(v, .25):.4f} | {np.quantile(v, .75):.4f} |")
  shape = rows[REFIT] - rows[REFIT_TRUTH]
  yaw = rows[YAW]
  print(f"\nper-image shape signal (template re-fit - truth re-fit): median {np.median(shape):.4f}"
        f", {np.mean(shape > 0):.0%} of images positive; against a 2-degree yaw error: "
        f"median ratio {np.median(shape / np.maximum(yaw, 1e-9)):.2f}", flush=True)


# ----------------------------------------------------------------------------
# capacity
# ----------------------------------------------------------------------------

class DepthPath(nn.Module):
  """The model's D path: image [-1, 1] -> raw depth map (f2_D(f1_D(I)), M = 0)."""
  nf: int
  embed_dim: int
  image_size: int

  @nn.compact
  def __call__(self, x):
    u = nets_lib.EDEncoder(self.nf, self.embed_dim)(x)
    return nets_lib.EDDecoder(self.nf, 1, self.image_size, "none")(u)[..., 0]


def capacity(variant, cfg, steps, seed, evals, with_normals=False):
  cam = model.camera(cfg)
  d = _load(variant, cfg)
  tr, te = d["train"], d["test"]
  net = DepthPath(cfg.nf_ed, cfg.embed_dim, cfg.image_size)
  ellipse = config.prior_ellipse(cfg)
  x_tr = model.to_model_range(tr["images"])
  params = net.init(jax.random.PRNGKey(seed), x_tr[:2])
  # The model's optimiser (train_step.make_optimizer without the warm-ups' masking):
  # Adam with Unsup3D's coupled L2 added to the gradient, or AdamW.
  if cfg.weight_decay_mode == "decoupled":
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  else:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))
  state = opt.init(params)

  def predict(p, x):
    return model.depth_from_raw(net.apply(p, x), cam, model.prior_amplitude(cfg), ellipse=ellipse)

  normals = jax.vmap(lambda z: render.depth_to_normals(z, cam))

  @jax.jit
  def step(p, s, x, t, m):
    def loss(p):
      pred = predict(p, x)
      out = jnp.sum(jnp.abs(pred - t) * m) / jnp.maximum(jnp.sum(m), 1.0)
      if with_normals:  # + the mean (1 - cos) between the normals, what MAD measures
        cos = jnp.sum(normals(pred) * normals(t), -1)
        out = out + jnp.sum((1 - cos) * m) / jnp.maximum(jnp.sum(m), 1.0)
      return out
    v, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, v

  pred_fn = jax.jit(predict)
  region = diagnostics.face_region(te["gt"]["canon_mask"], cfg.image_size)
  tmpl = np.mean(tr["gt"]["canon_depth"], 0)
  bs = cfg.batch_size
  t_depth, t_cov = evaluator.template_depth_baseline(tmpl, te["gt"]["view"], cam)
  tmpl_mad = evaluator.depth_summary(t_depth, t_cov, te["depth"], cam, bs)["mad_mean"]
  rng = np.random.default_rng(seed)
  canon, cmask = tr["gt"]["canon_depth"], tr["gt"]["canon_mask"].astype(np.float32)
  target = "depth + normals" if with_normals else "depth"
  print(f"\n### capacity: {variant}, seed {seed}, target {target}, nf_ed {cfg.nf_ed}, embed_dim "
        f"{cfg.embed_dim}, lr {cfg.lr}, weight decay {cfg.weight_decay:g} "
        f"({cfg.weight_decay_mode}), batch {bs} (template: test MAD {tmpl_mad:.2f})\n")
  print("| step | train L1 | test shape corr (median) | test MAD, true view | MAD / template |"
        " seconds |\n|---|---|---|---|---|---|", flush=True)
  t0, losses = time.time(), []
  for i in range(1, steps + 1):
    idx = rng.choice(len(x_tr), bs, replace=False)
    params, state, v = step(params, state, x_tr[idx], canon[idx], cmask[idx])
    losses.append(float(v))
    if i in evals or i == steps:
      x_te = model.to_model_range(te["images"])
      pred = np.concatenate([np.asarray(pred_fn(params, x_te[j:j + 100]))
                             for j in range(0, len(x_te), 100)])
      corr = diagnostics.shape_residual_corr(pred, te["gt"]["canon_depth"], region)
      depth, cov = _warp(pred, te["gt"]["view"], cam)
      mad = evaluator.depth_summary(depth, cov, te["depth"], cam, bs)["mad_mean"]
      print(f"| {i} | {np.mean(losses[-50:]):.4f} | {np.nanmedian(corr):.3f} | {mad:.2f} | "
            f"{mad / tmpl_mad:.2f} | {time.time() - t0:.0f} |", flush=True)


def _warp(canon_NxSxS, views_Nx6, cam, batch=100):
  out_d, out_c = [], []
  for j in range(0, len(canon_NxSxS), batch):
    dep, cov = render.warp_depth_batch(jnp.asarray(canon_NxSxS[j:j + batch]),
                                       jnp.asarray(views_Nx6[j:j + batch]), cam)
    out_d.append(np.asarray(dep))
    out_c.append(np.asarray(cov).astype(np.float32))
  return np.concatenate(out_d), np.concatenate(out_c)


def _mirrored(view_Nx6):
  """The pose of the convex/concave twin in the image: yaw, roll and x shift negated."""
  v = np.array(view_Nx6, np.float32)
  v[:, [1, 2, 3]] *= -1
  return v


def sign_rows(images, albedo01, light, view, scaffolds: dict, cam) -> dict:
  """{(scaffold, light): (fraction of images where the true pose renders better,
  mean L1(mirrored) - L1(true))} for each scaffold depth (name -> NxSxS) under
  the true light and a frontal one (dx = dy = 0)."""
  alb = albedo01 * 2 - 1
  alb = jnp.asarray(0.5 * (alb + alb[:, :, ::-1]), jnp.float32)
  front = np.array(light, np.float32)
  front[:, 2:] = 0
  mirrored = _mirrored(view)

  def l1(depth, lt, v):
    f = model.Factors(depth_BxSxS=jnp.asarray(depth, jnp.float32), albedo_BxSxSx3=alb,
                      ambient_B=jnp.asarray(lt[:, 0]), diffuse_B=jnp.asarray(lt[:, 1]),
                      light_dxy_Bx2=jnp.asarray(lt[:, 2:]), view_Bx6=jnp.asarray(v, jnp.float32))
    orig, _ = model.render_factors(f, cam)
    return np.asarray(jnp.mean(jnp.abs(orig.recon_image() - jnp.asarray(images)), axis=(1, 2, 3)))

  out = {}
  for name, depth in scaffolds.items():
    for lname, lt in (("true light", np.asarray(light, np.float32)), ("frontal light", front)):
      a, b = l1(depth, lt, view), l1(depth, lt, mirrored)
      out[(name, lname)] = (float(np.mean(a < b)), float(np.mean(b - a)))
  return out


def sign(variant, cfg, n):
  d = _load(variant, cfg)
  test, cam = d["test"], model.camera(cfg)
  n = min(n, len(test["images"]))
  gt = {k: np.asarray(v)[:n] for k, v in test["gt"].items()}
  size = cfg.image_size
  ell = model.fit_prior_ellipse(d["train"]["images"])
  prior = lambda amp, e=config.prior_ellipse(cfg): np.asarray(model.depth_from_raw(
      jnp.zeros((n, size, size)), cam, amp, ellipse=e))
  scaffolds = {"convex prior x1": prior(1.0), "convex prior x0.5": prior(0.5),
               "convex prior x0.25": prior(0.25), "fitted ellipse x1": prior(1.0, ell),
               "flat (no prior)": prior(0.0),
               "template (mean truth)": np.repeat(
                   d["train"]["gt"]["canon_depth"].mean(0, keepdims=True), n, 0)}
  rows = sign_rows(test["images"][:n], gt["canon_albedo"], gt["light"], gt["view"], scaffolds,
                   cam)
  print(f"\n{variant}: {n} test images; fitted ellipse {ell}")
  print("| scaffold depth | light | true pose better on | mean L1 mirrored - true |")
  print("|---|---|---|---|")
  for (name, lname), (frac, diff) in rows.items():
    print(f"| {name} | {lname} | {frac:.2f} | {diff:+.4f} |")


def main():
  p = argparse.ArgumentParser(prog="probe_shape.py", description=__doc__.split("\n")[0])
  p.add_argument("probe", choices=("signal", "capacity", "sign"))
  p.add_argument("--variants", default="default")
  p.add_argument("--preset", default="cpu_small")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--images", type=int, default=500, help="signal / sign: test images used")
  p.add_argument("--normals", action="store_true",
                 help="capacity: add the normals' mean (1 - cos) to the L1 (what MAD measures)")
  args = p.parse_args()
  try:
    cfg = runner.make_config(args.preset, args.set)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
      data.get_variant(v)
  except UserError as e:
    cliutil.fail(str(e), 2)
  evals = {s for s in (250, 500, 1000, 2000, 4000, 8000) if s < args.steps}
  for v in variants:
    if args.probe == "signal":
      signal(v, cfg, args.images)
    elif args.probe == "sign":
      sign(v, cfg, args.images)
    else:
      capacity(v, cfg, args.steps, args.seed, evals, args.normals)


if __name__ == "__main__":
  main()
