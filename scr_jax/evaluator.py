"""Batched inference over image arrays, with one batching and padding policy.

Every loop that runs a model over more images than fit in one batch goes
through `Evaluator.map`: batches of exactly `batch_size` images (one compiled
shape), the last one padded by repeating its last image, the padded rows
dropped from the outputs. The one exception is the validation loss
(`Evaluator.val_loss`): the loss is a mean over its batch, so a padded image
would count twice; it averages full batches only (the remainder is left out;
fewer images than one batch are wrapped around), as structure search always did.

Candidates (a Structure with a K axis, params with a leading K axis):
`each_candidate` pairs each candidate's params with its single structure for
the per-candidate loops (depth metrics, factors); `val_loss` scores all K in
one vmapped program (`train_step.over_candidates`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import dataset, metrics, model, structure as structure_lib, train_step


@functools.lru_cache(maxsize=16)
def make_eval_fn(nets, cfg):
  """(params, img, structure) -> (depth in the input view, prediction-valid
  mask), a single structure."""
  def fn(params, img, structure):
    out = model.forward(nets, params, img, structure, cfg)
    return out.orig.recon_depth_BxSxS, out.orig.recon_mask_BxSxS
  return structure_lib.jit(fn)


@functools.lru_cache(maxsize=16)
def make_factors_fn(nets, cfg):
  """(params, img_BxSxSx3, structure) -> the model's factors (no rendering),
  jitted; a single structure."""
  cam = model.camera(cfg)

  def fn(params, img, structure):
    f = model.factors(nets, params, img, structure, cfg)
    _, normal, shading = model.shade_canonical(f.depth_BxSxS, f.albedo_BxSxSx3, f.ambient_B,
                                               f.diffuse_B, f.light_dxy_Bx2, cam)
    light = jnp.concatenate([f.ambient_B[:, None], f.diffuse_B[:, None], f.light_dxy_Bx2], 1)
    return dict(view=f.view_Bx6, light=light, canon_depth=f.depth_BxSxS,
                canon_albedo=model.to_unit_range(f.albedo_BxSxSx3), canon_normal=normal,
                canon_shading=shading)
  return structure_lib.jit(fn)


def each_candidate(params, structure):
  """[(params_i, structure_i)] per candidate of a stacked structure (K > 0),
  else [(params, structure)]: the loops that run one candidate at a time."""
  if not structure.k:
    return [(params, structure)]
  return [(train_step.unstack_params(params, i), structure.candidate(i))
          for i in range(structure.k)]


def padded_batches(x_N, batch_size: int):
  """Yields (batch of exactly batch_size rows as numpy, number of real rows in
  it): consecutive batches of an array with a leading axis N, the last padded
  by repeating its last row."""
  n = x_N.shape[0]
  for i in range(0, n, batch_size):
    chunk = np.asarray(x_N[i:i + batch_size])
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)], 0)
    yield chunk, batch_size - pad


def map_padded(fn, x_N, batch_size: int):
  """fn(jax array of exactly batch_size rows) -> pytree of arrays with leading
  axis B, over all N rows of x_N (`padded_batches`: one compiled shape);
  returns the pytree as numpy with leading N, the padded rows dropped."""
  parts = []
  for chunk, real in padded_batches(x_N, batch_size):
    out = jax.device_get(fn(jnp.asarray(chunk)))
    parts.append(jax.tree_util.tree_map(lambda v, r=real: np.asarray(v)[:r], out))
  return jax.tree_util.tree_map(lambda *v: np.concatenate(v), *parts)


def full_batches(images_NxSxSx3, batch_size: int, limit=None):
  """Yields the full batches among the first `limit` images (the remainder
  that does not fill a batch is left out; with fewer images than one batch,
  one batch wrapped around)."""
  n = images_NxSxSx3.shape[0] if limit is None else min(limit, images_NxSxSx3.shape[0])
  for i in range(max(n // batch_size, 1)):
    chunk = images_NxSxSx3[i * batch_size:(i + 1) * batch_size]
    if chunk.shape[0] < batch_size:
      chunk = np.resize(chunk, (batch_size,) + chunk.shape[1:])
    yield chunk


def depth_summary(pred_NxSxS, valid_NxSxS, depth_NxSxS, cam, batch_size: int) -> dict:
  """SIDE / MAD summary of predicted against true depth (metric z), computed
  per batch of `batch_size` (Unsup3D protocol: the gt mask uses the batch's
  max depth), then summarised over all images."""
  per = []
  for i in range(0, pred_NxSxS.shape[0], batch_size):
    sl = slice(i, i + batch_size)
    per.append(metrics.evaluate_depth(jnp.asarray(pred_NxSxS[sl]), jnp.asarray(valid_NxSxS[sl]),
                                      jnp.asarray(depth_NxSxS[sl]), cam))
  return metrics.summarize(per)


def template_depth_baseline(mean_canon_HxW, views_Nx6, cam, batch: int = 100):
  """The template baseline: one canonical depth (e.g. the per-pixel mean of
  the train split's canonical ground truth) rendered into each test image's
  TRUE view, exactly as the model renders its own canonical depth
  (`metrics.warp_template`).

  It knows the pose but not the individual shape: a model that reconstructs
  each face's own shape must beat it. views_Nx6: (rx, ry, rz radians, tx,
  ty, tz). Returns (depth_NxHxW in the view, far where uncovered;
  covered_NxHxW float 0/1, the prediction-valid mask).
  Raises:
    ValueError: the template is not cam.height x cam.width.
  """
  canon = jnp.asarray(mean_canon_HxW, jnp.float32)
  if canon.shape != (cam.height, cam.width):
    raise ValueError(f"template must be {cam.height}x{cam.width} for this camera, "
                     f"got {tuple(canon.shape)}")
  views = np.asarray(views_Nx6, np.float32)
  if not len(views):
    empty = np.zeros((0, cam.height, cam.width), np.float32)
    return empty, empty
  depth, covered = map_padded(lambda v: metrics.warp_template(canon, v, cam), views,
                              min(batch, len(views)))
  return depth, covered.astype(np.float32)


def baseline_summaries(test_gt_NxHxW, train_gt_MxHxW, cam, batch: int = 100,
                       test_views_Nx6=None, train_canon_depth_MxHxW=None) -> dict:
  """Summaries (`depth_summary`) of the reference predictions on a test
  split: 'constant null depth' (a constant map), 'average GT depth'
  (per-pixel mean of the train split's ground truth) and, when the test views
  and the train split's canonical depths are given (generated data), the
  template baseline `metrics.TEMPLATE` (`template_depth_baseline` of the mean
  canonical depth; its prediction-valid mask is the rendered coverage, as the
  model's)."""
  test_gt = np.asarray(test_gt_NxHxW, np.float32)
  avg = np.asarray(metrics.average_depth_baseline(jnp.asarray(train_gt_MxHxW)))
  ones = np.ones_like(test_gt)
  preds = {"constant null depth": (np.ones_like(test_gt), ones),
           "average GT depth": (np.broadcast_to(avg, test_gt.shape), ones)}
  if test_views_Nx6 is not None and train_canon_depth_MxHxW is not None:
    mean_canon = np.mean(np.asarray(train_canon_depth_MxHxW, np.float64), axis=0)
    preds[metrics.TEMPLATE] = template_depth_baseline(mean_canon, test_views_Nx6, cam, batch)
  return {name: depth_summary(pred, valid, test_gt, cam, batch)
          for name, (pred, valid) in preds.items()}


def baselines(test: dict, train: dict, cfg) -> dict:
  """`baseline_summaries` of two loaded splits with depth (`dataset.load_split`),
  the template row when both carry the generator's ground truth."""
  return baseline_summaries(test["depth"], train["depth"], model.camera(cfg),
                            **metrics.template_kwargs(test, train))


def baselines_for(spec: str, test: dict, cfg):
  """`baselines` of `test` (a loaded split of `--data spec`) against spec's
  train split; None when spec has no train split with depth."""
  if not dataset.has_depth(spec, cfg, "train"):
    return None
  return baselines(test, dataset.load_split(spec, "train", cfg), cfg)


class Evaluator:
  """Runs a model (nets, cfg) over image arrays in fixed-size batches.

  batch_size: images per compiled call (default cfg.batch_size).
  The jitted functions are cached per (nets, cfg), so making an Evaluator is
  cheap; structures enter by value (`structure.jit`).
  """

  def __init__(self, nets, cfg, batch_size=None):
    self.nets, self.cfg = nets, cfg
    self.batch_size = batch_size or cfg.batch_size

  def map(self, fn, images_NxSxSx3):
    """fn(img_BxSxSx3) -> pytree of arrays with leading axis B, over all
    images (`padded_batches`); returns the pytree as numpy with leading N."""
    return map_padded(fn, images_NxSxSx3, self.batch_size)

  def depth(self, params, images_NxSxSx3, structure):
    """(depth NxSxS in the input view, prediction-valid mask NxSxS), numpy; a
    single structure."""
    fn = make_eval_fn(self.nets, self.cfg)
    return self.map(lambda img: fn(params, img, structure), images_NxSxSx3)

  def factors(self, params, images_NxSxSx3, structure) -> dict:
    """The model's factors, numpy: view Nx6, light Nx4, canon_depth NxSxS,
    canon_albedo NxSxSx3 in [0, 1], canon_normal NxSxSx3, canon_shading NxSxS;
    a single structure."""
    fn = make_factors_fn(self.nets, self.cfg)
    structure = structure.replace(m=jnp.asarray(structure.m))
    return self.map(lambda img: fn(params, img, structure), images_NxSxSx3)

  def evaluate(self, params, data: dict, structure, limit=None):
    """SIDE / MAD on a split with ground-truth depth (its first `limit`
    images; Unsup3D protocol: batch-wise gt max, eroded masks), a single
    structure. Returns (summary dict, pred NxSxS, valid NxSxS)."""
    n = data["images"].shape[0] if limit is None else min(limit, data["images"].shape[0])
    pred, valid = self.depth(params, data["images"][:n], structure)
    summ = depth_summary(pred, valid, data["depth"][:n], model.camera(self.cfg), self.batch_size)
    return summ, pred, valid

  def val_loss(self, params, images_NxSxSx3, structure, limit=None):
    """Mean photometric loss over `full_batches` (the objective of structure
    search): a float, or a K array for a stacked structure (vmapped)."""
    fn = train_step.make_val_loss_fn(self.nets, self.cfg, stacked=bool(structure.k))
    tot, nb = 0.0, 0
    for chunk in full_batches(images_NxSxSx3, self.batch_size, limit):
      tot = tot + np.asarray(fn(params, jnp.asarray(chunk), structure))
      nb += 1
    return tot / nb
