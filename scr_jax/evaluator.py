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

from scr_jax import metrics, model, structure as structure_lib, train_step


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


def padded_batches(images_NxSxSx3, batch_size: int):
  """Yields (batch_BxSxSx3 numpy, number of real images in it): consecutive
  batches of exactly batch_size, the last padded by repeating its last image."""
  n = images_NxSxSx3.shape[0]
  for i in range(0, n, batch_size):
    chunk = np.asarray(images_NxSxSx3[i:i + batch_size])
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)], 0)
    yield chunk, batch_size - pad


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
    parts = []
    for chunk, real in padded_batches(images_NxSxSx3, self.batch_size):
      out = jax.device_get(fn(jnp.asarray(chunk)))
      parts.append(jax.tree_util.tree_map(lambda v, r=real: np.asarray(v)[:r], out))
    return jax.tree_util.tree_map(lambda *v: np.concatenate(v), *parts)

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
