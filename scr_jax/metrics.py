"""Depth evaluation as Unsup3D does it: SIDE and MAD on eroded masks, in JAX.

Protocol (per image of a batch):
  * mask = erode(gt < gt_max) * erode(pred_valid), where gt_max is the max of
    the ground truth over the WHOLE batch (Unsup3D) unless given explicitly,
    and erode = 3x3 average pool with zero padding, > 0.99 (so the 1-pixel
    image border is always out, and every masked pixel has all 8 neighbours
    inside the un-eroded masks: central-difference normals there never see
    background or invalid prediction).
  * SIDE = sqrt(masked variance of log(pred) - log(gt)); scale invariant.
  * MAD = masked mean angle (degrees) between normals of pred and gt, with
    normals from central differences of back-projected points
    (`render.depth_to_normals` conventions).

Two MADs are reported:
  * `mad`: exact unit normals. A perfect prediction or a global depth scale
    scores 0.
  * `mad_unsup3d`: normals normalised as n / (|n| + 1e-7) like Unsup3D. At
    64 px and fov 10 the raw cross product is only ~3e-5 long, so these
    normals are ~0.3 % short and even a perfect prediction scores 5.9-7.2
    degrees (plane at depth 1.1-0.9; the floor is arccos(s^2), s = L/(L+1e-7)
    with L = (2 z / f)^2 on a fronto-parallel plane).
    Published numbers (Unsup3D's, SCR's) carry this floor; compare them with
    `mad_unsup3d`, never with `mad`.

Empty masks: an image whose mask is empty gets NaN metrics and valid=False;
`summarize` skips such images and counts them in `n_skipped`. Nothing is
divided by zero silently.

All array functions take a batch (leading B axis) and are jit-able with the
`render.Camera` static; `evaluate_depth` is jitted already (one compile per
shape and camera).
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import render

UNSUP3D_NORMAL_EPS = 1e-7  # Unsup3D's normalisation eps (source of its MAD floor)
_ERODE_THRESHOLD = 0.99


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def erode(mask_BxHxW):
  """One-pixel erosion: 3x3 mean with zero padding > 0.99. Returns float 0/1."""
  m = jnp.asarray(mask_BxHxW, jnp.float32)
  # Zero padding counts in the denominator (avg_pool count_include_pad), so
  # pixels on the image border never survive.
  summed = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1),
                                 ((0, 0), (1, 1), (1, 1)))
  return (summed / 9.0 > _ERODE_THRESHOLD).astype(jnp.float32)


def eval_mask(pred_valid_BxHxW, gt_BxHxW, gt_max=None):
  """Evaluation mask erode(gt < gt_max) * erode(pred_valid), float 0/1 BxHxW.

  gt_max=None uses the max of gt over the whole batch, as Unsup3D does (there
  the background holds the clamped far depth, so the max is the background).
  Results then depend on how the test set is batched if some batch has no
  background pixel; pass a fixed gt_max (e.g. the dataset's background depth)
  to make evaluation in any number of batches identical.
  """
  gt = jnp.asarray(gt_BxHxW)
  if gt_max is None:
    gt_max = jnp.max(gt)
  return erode(gt < gt_max) * erode(jnp.asarray(pred_valid_BxHxW) > 0)


def _masked_mean(x_BxHxW, mask_BxHxW):
  """Per-image mean of x over mask. Returns (mean_B, NaN where empty; valid_B)."""
  m = jnp.asarray(mask_BxHxW, x_BxHxW.dtype)
  count_B = jnp.sum(m, axis=(1, 2))
  valid_B = count_B > 0
  total_B = jnp.sum(jnp.where(m > 0, x_BxHxW, 0.0) * m, axis=(1, 2))
  mean_B = jnp.where(valid_B, total_B / jnp.where(valid_B, count_B, 1.0), jnp.nan)
  return mean_B, valid_B


# ----------------------------------------------------------------------------
# SIDE
# ----------------------------------------------------------------------------

def side(pred_BxHxW, gt_BxHxW, mask_BxHxW):
  """Raw scale-invariant depth error per image (NOT x1e-2 scaled).

  sqrt(max(0, masked variance of log(pred) - log(gt))). The variance is the
  masked mean of squares minus the squared masked mean, evaluated in the
  equivalent two-pass form mean((d - mean(d))^2): in float32 the one-pass
  form cancels to ~1e-7 noise whose sqrt (~5e-4) would hide a perfect scale.
  Returns (side_B, NaN where the mask is empty; valid_B).
  """
  pred = jnp.asarray(pred_BxHxW, jnp.float32)
  gt = jnp.asarray(gt_BxHxW, jnp.float32)
  m = jnp.asarray(mask_BxHxW, jnp.float32)
  inside = m > 0
  # Unmasked pixels may hold anything (0, far, negative): keep NaNs out of the sums.
  d = jnp.where(inside, jnp.log(jnp.where(inside, pred, 1.0))
                - jnp.log(jnp.where(inside, gt, 1.0)), 0.0)
  mean_B, valid_B = _masked_mean(d, m)
  centred = jnp.where(inside, d - jnp.where(valid_B, mean_B, 0.0)[:, None, None], 0.0)
  var_B, _ = _masked_mean(centred**2, m)
  return jnp.sqrt(jnp.maximum(var_B, 0.0)), valid_B


# ----------------------------------------------------------------------------
# Normals and MAD
# ----------------------------------------------------------------------------

def normals_unsup3d(depth_HxW, cam: render.Camera):
  """Normals normalised like Unsup3D, n / (|n| + 1e-7), HxWx3.

  Same raw central-difference cross product as `render.depth_to_normals`,
  border (0, 0, 1); only the normalisation differs (see module doc: the eps
  shortens small normals and puts a floor under MAD).
  """
  p = render.depth_to_points(depth_HxW, cam)
  tu = p[1:-1, 2:] - p[1:-1, :-2]
  tv = p[2:, 1:-1] - p[:-2, 1:-1]
  n = jnp.zeros(p.shape, p.dtype).at[..., 2].set(1.0)
  n = n.at[1:-1, 1:-1].set(jnp.cross(tu, tv))
  return n / (jnp.linalg.norm(n, axis=-1, keepdims=True) + UNSUP3D_NORMAL_EPS)


def normals(depth_BxHxW, cam: render.Camera):
  """Exact unit normals of a batch (vmapped `render.depth_to_normals`), BxHxWx3."""
  return jax.vmap(lambda d: render.depth_to_normals(d, cam))(depth_BxHxW)


def normals_unsup3d_batch(depth_BxHxW, cam: render.Camera):
  """`normals_unsup3d` over a batch, BxHxWx3."""
  return jax.vmap(lambda d: normals_unsup3d(d, cam))(depth_BxHxW)


def _angle_deg_exact(n1_BxHxWx3, n2_BxHxWx3):
  """Angle between unit vectors as atan2(|n1 x n2|, n1 . n2), in degrees.

  Equal to arccos(clip(n1 . n2, -1, 1)) for unit vectors, but stable near 0:
  in float32 a dot product one ulp below 1 makes arccos read ~0.02 degrees,
  which would give a perfect prediction a spurious nonzero MAD.
  """
  cross = jnp.linalg.norm(jnp.cross(n1_BxHxWx3, n2_BxHxWx3), axis=-1)
  dot = jnp.sum(n1_BxHxWx3 * n2_BxHxWx3, axis=-1)
  return jnp.rad2deg(jnp.arctan2(cross, dot))


def _angle_deg_unsup3d(n1_BxHxWx3, n2_BxHxWx3):
  """arccos(clip(n1 . n2, -1, 1)) in degrees, exactly Unsup3D's formula (keeps
  the floor of its short normals; atan2 would remove it)."""
  dot = jnp.sum(n1_BxHxWx3 * n2_BxHxWx3, axis=-1)
  return jnp.rad2deg(jnp.arccos(jnp.clip(dot, -1.0, 1.0)))


def mad(pred_BxHxW, gt_BxHxW, mask_BxHxW, cam: render.Camera):
  """Mean angular deviation (degrees) with exact unit normals.

  Returns (mad_B, NaN where the mask is empty; valid_B).
  """
  ang = _angle_deg_exact(normals(jnp.asarray(pred_BxHxW, jnp.float32), cam),
                         normals(jnp.asarray(gt_BxHxW, jnp.float32), cam))
  return _masked_mean(ang, mask_BxHxW)


def mad_unsup3d(pred_BxHxW, gt_BxHxW, mask_BxHxW, cam: render.Camera):
  """MAD (degrees) with Unsup3D's n/(|n|+1e-7) normals; comparable with
  published numbers, floor ~6-7 degrees at 64 px, fov 10.

  Returns (mad_B, NaN where the mask is empty; valid_B).
  """
  ang = _angle_deg_unsup3d(
      normals_unsup3d_batch(jnp.asarray(pred_BxHxW, jnp.float32), cam),
      normals_unsup3d_batch(jnp.asarray(gt_BxHxW, jnp.float32), cam))
  return _masked_mean(ang, mask_BxHxW)


# ----------------------------------------------------------------------------
# Whole evaluation
# ----------------------------------------------------------------------------

def evaluate_depth(pred_BxHxW, pred_valid_BxHxW, gt_BxHxW, cam: render.Camera,
                   gt_max=None):
  """Per-image metrics of a batch (jitted; also traceable inside a jit).

  Returns dict of B-arrays: side (x1e-2 scaled, i.e. raw SIDE * 100), mad and
  mad_unsup3d (degrees), valid (bool; False = empty mask, metrics NaN) and
  n_pixels (mask size). gt_max: see `eval_mask` (None = max of this batch).
  """
  gt = jnp.asarray(gt_BxHxW, jnp.float32)
  for name, x in (("pred", pred_BxHxW), ("pred_valid", pred_valid_BxHxW), ("gt", gt)):
    if jnp.ndim(x) != 3 or tuple(jnp.shape(x)[1:]) != (cam.height, cam.width):
      raise ValueError(f"{name} must be Bx{cam.height}x{cam.width} for this camera, "
                       f"got shape {tuple(jnp.shape(x))}")
  # Resolved here so that both gt_max forms share one compiled program.
  gt_max = jnp.max(gt) if gt_max is None else jnp.asarray(gt_max, jnp.float32)
  return _evaluate_depth(pred_BxHxW, pred_valid_BxHxW, gt, gt_max, cam)


@functools.partial(jax.jit, static_argnames=("cam",))
def _evaluate_depth(pred_BxHxW, pred_valid_BxHxW, gt_BxHxW, gt_max, cam):
  mask = eval_mask(pred_valid_BxHxW, gt_BxHxW, gt_max)
  side_B, valid_B = side(pred_BxHxW, gt_BxHxW, mask)
  mad_B, _ = mad(pred_BxHxW, gt_BxHxW, mask, cam)
  mad_u_B, _ = mad_unsup3d(pred_BxHxW, gt_BxHxW, mask, cam)
  return dict(side=side_B * 100.0, mad=mad_B, mad_unsup3d=mad_u_B,
              valid=valid_B, n_pixels=jnp.sum(mask, axis=(1, 2)))


_SUMMARY_KEYS = ("side", "mad", "mad_unsup3d")


def summarize(per_image: Union[Mapping, Sequence[Mapping]]) -> dict:
  """Means and population stds (np.std) over valid images.

  per_image: one dict from `evaluate_depth` (possibly already concatenated)
  or a list of them (one per batch). Images with valid=False are skipped and
  counted in n_skipped; with no valid image the means/stds are NaN.
  Returns {side_mean, side_std, mad_mean, mad_std, mad_unsup3d_mean,
  mad_unsup3d_std, n, n_skipped}.
  """
  if isinstance(per_image, Mapping):
    per_image = [per_image]
  cat = {k: np.concatenate([np.atleast_1d(np.asarray(d[k])) for d in per_image])
         for k in _SUMMARY_KEYS + ("valid",)}
  valid = cat["valid"].astype(bool)
  out = {}
  for k in _SUMMARY_KEYS:
    v = cat[k][valid].astype(np.float64)
    out[f"{k}_mean"] = float(np.mean(v)) if v.size else float("nan")
    out[f"{k}_std"] = float(np.std(v)) if v.size else float("nan")
  out["n"] = int(valid.sum())
  out["n_skipped"] = int((~valid).sum())
  return out


SIDE_UNIT = "x1e-2 (side_mean = 100 * SIDE; side_raw_* hold SIDE itself, as Unsup3D's files)"
MAD_UNIT = "degrees"


def with_units(summary: dict) -> dict:
  """A `summarize` dict as written to JSON for people and other tools: the
  same keys (side_* scaled x1e-2, as the paper's tables) plus side_raw_mean /
  side_raw_std (unscaled SIDE, what Unsup3D writes) and the units of each."""
  out = dict(summary)
  for k in ("mean", "std"):
    if f"side_{k}" in out:
      out[f"side_raw_{k}"] = out[f"side_{k}"] / 100.0
  out.update(side_unit=SIDE_UNIT, mad_unit=MAD_UNIT)
  return out


# ----------------------------------------------------------------------------
# Baselines (use an all-ones prediction-valid mask with both)
# ----------------------------------------------------------------------------

def constant_depth_baseline(gt_BxHxW, value: float = 1.0):
  """Constant null depth: a BxHxW map of `value`, shaped like gt.

  SIDE is scale invariant, so any positive constant gives the same SIDE;
  its normals are all (0, 0, 1). Evaluate with pred_valid = ones.
  """
  return jnp.full(jnp.shape(gt_BxHxW), value, jnp.float32)


def average_depth_baseline(train_gt_NxHxW):
  """Per-pixel mean of the train split's ground-truth depth maps, HxW.

  Used as the prediction for every test image (broadcast to the test batch,
  e.g. `jnp.broadcast_to(avg_HxW, gt_BxHxW.shape)`), with pred_valid = ones.
  """
  # float64 on the host: a long float32 running sum over a big split drifts.
  return jnp.asarray(np.mean(np.asarray(train_gt_NxHxW, np.float64), axis=0),
                     jnp.float32)


@functools.partial(jax.jit, static_argnames=("cam",))
def warp_template(canon_HxW, views_Bx6, cam):
  """One canonical depth rendered into B views exactly as the model renders
  its own (`render.warp_depth_batch`): (depth_BxHxW, far where uncovered;
  covered_BxHxW bool). The template baseline, batched over a split by
  `evaluator.template_depth_baseline`."""
  depth = jnp.broadcast_to(canon_HxW, (views_Bx6.shape[0],) + canon_HxW.shape)
  return render.warp_depth_batch(depth, views_Bx6, cam)


TEMPLATE = "template depth, true view"


def template_kwargs(test: Mapping, train: Mapping) -> dict:
  """The template-baseline arguments of `baseline_summaries` from two loaded
  splits that carry the generator's ground truth (data dicts with "gt", see
  data.load_gt); {} when either has none (real data: no template row)."""
  if test.get("gt") is None or train.get("gt") is None:
    return {}
  return dict(test_views_Nx6=test["gt"]["view"],
              train_canon_depth_MxHxW=train["gt"]["canon_depth"])
