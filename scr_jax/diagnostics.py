"""What each factor learned, where the data carries ground truth.

The built-in generator stores every sample's view, light, canonical depth and
albedo beside the images (`{split}/gt.npz`, see `data.GT_CONVENTION`); the
functions here compare the model's factors with them. They are pure numpy
functions of arrays (prediction and truth in the same conventions), plus
`evaluate` (the model run by `evaluator.Evaluator.factors`) and `picture_grid`.

Conventions (the generator's and the model's are the same: `model.view_from_raw`,
`model.light_from_raw`, `render.py`):
  * view_Nx6 = (rx, ry, rz, tx, ty, tz), rotations in radians; reported in
    degrees as pitch (rx), yaw (ry), roll (rz).
  * light_Nx4 = (ambient, diffuse, dx, dy), direction normalize(dx, dy, 1) in
    the canonical frame.
  * canon_depth_NxSxS: metric z of the canonical (frontal) face; smaller = nearer.

What can and cannot be compared: a left-right symmetric canonical frame fixes
yaw and roll, but a model may settle on a canonical face that is pitched
against the generator's (and shifted vertically). So pitch is judged after
removing the mean offset (pred - true), and the offset itself is reported.
The light direction lives in the canonical frame, so such a pitch offset also
tilts it; and albedo x k with shading / k gives the same image, so ambient and
diffuse are only defined up to that scale. Read the light errors with both in
mind; the view, depth sign and shape spread have no such ambiguity.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import model, render, visualize
from scr_jax.evaluator import Evaluator

# Relief regions in normalised image coordinates (u, v in [-1, 1] across the
# frame): the centre disc (nose, the front of the head) against a ring over
# brows, cheeks, mouth and jaw, inside every generated face's silhouette
# (half-widths >= 0.84 x 0.94) and clear of the model's 2 fixed border columns.
_CENTRE_R = 0.3
_RING_R = (0.5, 0.75)
_BORDER_COLS = 2  # model.depth_from_raw fixes the 2 leftmost / rightmost columns


def pearson(a_N, b_N) -> float:
  """Pearson correlation of two 1-D samples.

  Returns 0.0 when the first (the prediction) is constant (a collapsed
  prediction carries no information), NaN when the second (the truth) is
  constant or there are fewer than 2 samples.
  """
  a = np.asarray(a_N, np.float64)
  b = np.asarray(b_N, np.float64)
  if a.size < 2 or np.std(b) < 1e-12:
    return float("nan")
  if np.std(a) < 1e-12:
    return 0.0
  return float(np.corrcoef(a, b)[0, 1])


def view_errors(pred_view_Nx6, true_view_Nx6) -> dict:
  """Pose errors in degrees.

  For each of pitch (rx), yaw (ry), roll (rz): the mean absolute error
  `view_{name}_mae_deg` and the Pearson correlation with the truth
  `view_{name}_corr`. Pitch is judged after removing the mean offset
  mean(pred - true), reported as `view_pitch_offset_deg` (the canonical frame
  does not fix it). `view_mae_deg` is the mean of the three errors.
  """
  pred = np.rad2deg(np.asarray(pred_view_Nx6, np.float64)[:, :3])
  true = np.rad2deg(np.asarray(true_view_Nx6, np.float64)[:, :3])
  out = {}
  for i, name in enumerate(("pitch", "yaw", "roll")):
    d = pred[:, i] - true[:, i]
    if name == "pitch":
      out["view_pitch_offset_deg"] = float(np.mean(d))
      d = d - np.mean(d)
    out[f"view_{name}_mae_deg"] = float(np.mean(np.abs(d)))
    out[f"view_{name}_corr"] = pearson(pred[:, i], true[:, i])
  out["view_mae_deg"] = float(np.mean([out[f"view_{n}_mae_deg"]
                                       for n in ("pitch", "yaw", "roll")]))
  return out


def light_direction_Nx3(light_Nx4):
  """Unit light directions normalize(dx, dy, 1), Nx3."""
  l = np.asarray(light_Nx4, np.float64)
  d = np.concatenate([l[:, 2:4], np.ones((len(l), 1))], axis=1)
  return d / np.linalg.norm(d, axis=1, keepdims=True)


def light_obliqueness_deg(light_Nx4) -> np.ndarray:
  """Angle (degrees, in [0, 90)) between each light direction normalize(dx, dy, 1)
  and the view axis: 0 = frontal light, near 90 = grazing."""
  l = np.asarray(light_Nx4, np.float64)
  return np.rad2deg(np.arctan(np.hypot(l[:, 2], l[:, 3])))


def light_errors(pred_light_Nx4, true_light_Nx4) -> dict:
  """Mean absolute ambient / diffuse errors (shading units), the mean angle
  between the light directions (degrees; atan2 form, exact near 0) and
  light_oblique_slope: the least-squares slope of the predicted obliqueness
  (`light_obliqueness_deg`) on the true one. 1: as oblique as the truth; below
  1: too frontal, above: too grazing. With a deeper (flatter) relief a more
  frontal (grazing) light gives about the same shading, the bas-relief trade of
  Lambertian shading, so read it beside `relief_ratio`. NaN when the true
  obliqueness does not vary."""
  p = np.asarray(pred_light_Nx4, np.float64)
  t = np.asarray(true_light_Nx4, np.float64)
  dp, dt = light_direction_Nx3(p), light_direction_Nx3(t)
  ang = np.rad2deg(np.arctan2(np.linalg.norm(np.cross(dp, dt), axis=1),
                              np.sum(dp * dt, axis=1)))
  op, ot = light_obliqueness_deg(p), light_obliqueness_deg(t)
  ot_c = ot - ot.mean()
  var = float(np.dot(ot_c, ot_c))
  slope = float(np.dot(op - op.mean(), ot_c) / var) if var > 1e-12 else float("nan")
  return dict(light_ambient_mae=float(np.mean(np.abs(p[:, 0] - t[:, 0]))),
              light_diffuse_mae=float(np.mean(np.abs(p[:, 1] - t[:, 1]))),
              light_dir_deg=float(np.mean(ang)), light_oblique_slope=slope)


def light_intensity(light_Nx4) -> float:
  """The mean over images of ambient + diffuse (the first two light columns,
  each in [0, 1]). Near 0 the render is black whatever the albedo: the
  collapse in which the light's tanh saturates and no gradient reaches any
  factor any more (docs/learning.md, session 18)."""
  l = np.asarray(light_Nx4, np.float64)
  return float(np.mean(l[:, 0] + l[:, 1]))


def silhouette_parallax(images_NxSxSx3, yaw_N, threshold: float = 0.08) -> dict:
  """How the object's silhouette moves sideways with the true yaw: a
  property of the data (where the object's outline lies against the
  rotation centre), not of a model.

  The centroid column of each image's `model.object_masks` in [-1, 1]
  (half-widths, +1 = right edge) is regressed on the yaw (radians).
  Returns {"slope": half-widths per radian, "corr": Pearson in [-1, 1]}.
  Its sign tells which way a rotation carries the outline: on the built-in
  heads (outline behind the rotation centre) it is positive; on the car
  (a body in front of it) negative, the one variant whose yaw training
  mirrors (docs/learning.md, issue 20 session 20).

  Raises:
    ValueError: fewer than 2 images, or yaw_N not of length N.
  """
  yaw = np.asarray(yaw_N, np.float64).reshape(-1)
  masks = model.object_masks(images_NxSxSx3, threshold)
  if masks.shape[0] < 2 or yaw.shape[0] != masks.shape[0]:
    raise ValueError(f"need N >= 2 images and N yaws, got {masks.shape[0]} images and "
                     f"{yaw.shape[0]} yaws")
  t = np.linspace(-1, 1, masks.shape[-1])
  cx = (masks * t[None, None, :]).sum(axis=(1, 2)) / np.maximum(masks.sum(axis=(1, 2)), 1)
  yc = yaw - yaw.mean()
  slope = float(np.dot(cx - cx.mean(), yc) / max(np.dot(yc, yc), 1e-12))
  return dict(slope=slope, corr=pearson(cx, yaw))


def yaw_std_ratio(pred_view_Nx6, true_view_Nx6) -> float:
  """The predicted yaw's standard deviation over the images against the
  truth's (1: the poses vary as much as the truth's, ~0: a constant view).
  NaN when the true yaw does not vary."""
  p = np.asarray(pred_view_Nx6, np.float64)[:, 1]
  t = np.asarray(true_view_Nx6, np.float64)[:, 1]
  return float(np.std(p) / np.std(t)) if np.std(t) > 1e-12 else float("nan")


# Thresholds of `fault` (what the benchmark calls a failed run and names its kind).
BLACK_RENDER = 0.05  # light_intensity below: the light died
CONSTANT_VIEW = 0.1  # view_yaw_std_ratio below: the view stopped reading the image
MIN_YAW_CORR = 0.9  # view_yaw_corr below: the yaw is not learned (issue 20's criterion)


def fault(diag: dict, mad=None, avg_gt_mad=None) -> str:
  """The kind of failure of a trained model, from its `diagnose` dict (keys
  missing from older results are skipped): "" when it learned, else the first
  of "black render" (light_intensity < BLACK_RENDER), "constant view"
  (view_yaw_std_ratio < CONSTANT_VIEW), "concave" (depth_sign <= 0.5: the
  relief inverted on most images), "mirrored yaw" (view_yaw_corr <= -0.5),
  "weak yaw" (view_yaw_corr < MIN_YAW_CORR) and "MAD >= avg-GT" (mad, when
  given, not below avg_gt_mad). The order is the causal one seen in
  training: a black render also leaves a constant view, a concave relief
  comes with a mirrored yaw."""
  get = lambda k: diag.get(k) if diag.get(k) == diag.get(k) else None  # NaN -> None
  checks = (("black render", get("light_intensity") is not None
             and get("light_intensity") < BLACK_RENDER),
            ("constant view", get("view_yaw_std_ratio") is not None
             and get("view_yaw_std_ratio") < CONSTANT_VIEW),
            ("concave", get("depth_sign") is not None and get("depth_sign") <= 0.5),
            ("mirrored yaw", get("view_yaw_corr") is not None and get("view_yaw_corr") <= -0.5),
            ("weak yaw", get("view_yaw_corr") is not None and get("view_yaw_corr") < MIN_YAW_CORR),
            ("MAD >= avg-GT", mad is not None and avg_gt_mad is not None and mad >= avg_gt_mad))
  return next((name for name, bad in checks if bad), "")


def relief_ratio(pred_depth_NxSxS, true_depth_NxSxS, region_SxS) -> float:
  """How deep the predicted canonical relief is against the truth: the median
  over images of std(pred) / std(truth) over the region (each image's own
  depth variation; level-free). 1: as deep; 2: twice as deep; 0: flat. NaN
  when no truth varies."""
  p = np.asarray(pred_depth_NxSxS, np.float64)[:, region_SxS].std(axis=1)
  t = np.asarray(true_depth_NxSxS, np.float64)[:, region_SxS].std(axis=1)
  ok = t > 1e-12
  return float(np.median(p[ok] / t[ok])) if ok.any() else float("nan")


def _radius(size: int) -> np.ndarray:
  """Normalised radius sqrt(u^2 + v^2) of each pixel, u, v in [-1, 1], SxS."""
  g = (np.arange(size) - (size - 1) / 2.0) / ((size - 1) / 2.0)
  return np.sqrt(g[None, :] ** 2 + g[:, None] ** 2)


def relief(canon_depth_NxSxS) -> np.ndarray:
  """Per-image relief (metric): median depth over the ring (0.5 <= r <= 0.75)
  minus the median over the centre (r <= 0.3), r the normalised radius.

  Positive = the centre is nearer the camera than the surrounding face: a
  convex (face-like) surface; negative = inverted (hollow). Medians, not
  means, so a few outlier pixels (a spike, a dent) cannot flip the sign.
  Returns N floats.
  """
  d = np.asarray(canon_depth_NxSxS, np.float64)
  r = _radius(d.shape[-1])
  centre, ring = r <= _CENTRE_R, (r >= _RING_R[0]) & (r <= _RING_R[1])
  return np.median(d[:, ring], axis=1) - np.median(d[:, centre], axis=1)


def depth_sign(canon_depth_NxSxS) -> float:
  """Fraction of images whose canonical relief is convex (`relief` > 0), in [0, 1]."""
  return float(np.mean(relief(canon_depth_NxSxS) > 0))


def face_region(canon_mask_NxSxS=None, size: int | None = None) -> np.ndarray:
  """Pixels over which canonical shapes are compared (SxS bool).

  With ground-truth silhouettes: the pixels inside at least half of them;
  without: the ellipse u^2 / 0.8^2 + v^2 / 0.9^2 < 1. Either way minus the
  1-pixel image border and the model's 2 fixed columns each side.
  """
  if canon_mask_NxSxS is not None:
    m = np.mean(np.asarray(canon_mask_NxSxS, np.float64), axis=0) >= 0.5
    size = m.shape[-1]
  else:
    g = (np.arange(size) - (size - 1) / 2.0) / ((size - 1) / 2.0)
    m = (g[None, :] / 0.8) ** 2 + (g[:, None] / 0.9) ** 2 < 1.0
  m = m.copy()
  m[:, :_BORDER_COLS] = m[:, -_BORDER_COLS:] = False
  m[0, :] = m[-1, :] = False
  return m


def shape_spread(canon_depth_NxSxS, region_SxS) -> float:
  """How much canonical shapes differ across images (metric depth units).

  Each image's depth minus its own mean over the region (the depth head
  removes the per-image level anyway), then the per-pixel std across the
  images, averaged over the region. 0 = every image has the same shape (a
  template). A collapse detector, not a score: noise counts as spread too.
  """
  d = np.asarray(canon_depth_NxSxS, np.float64)[:, region_SxS]
  d = d - d.mean(axis=1, keepdims=True)
  return float(np.mean(np.std(d, axis=0)))


def shape_residual_corr(pred_depth_NxSxS, true_depth_NxSxS, region_SxS) -> np.ndarray:
  """Per-image shape recovery beyond the template, each in [-1, 1] (N floats).

  For each image, the Pearson correlation over the region between its
  predicted canonical depth minus the mean predicted canonical depth (over
  the N images: the model's own template) and its true canonical depth minus
  the mean true one. Each map's level (its mean over the region) is removed
  first, as the depth head removes it. 1: every image's own departure from
  the average shape is recovered (up to scale); 0: none of it (a template,
  or noise); -1: inverted. 0 where the prediction residual is constant (a
  template predicts no residual); NaN where the truth's is (or N < 2).
  """
  p = np.asarray(pred_depth_NxSxS, np.float64)[:, region_SxS]
  t = np.asarray(true_depth_NxSxS, np.float64)[:, region_SxS]
  if len(p) != len(t):
    raise ValueError(f"pred has {len(p)} depth maps, ground truth {len(t)}")
  if len(t) < 2:
    return np.full(len(t), np.nan)
  p = p - p.mean(axis=1, keepdims=True)
  t = t - t.mean(axis=1, keepdims=True)
  p, t = p - p.mean(axis=0), t - t.mean(axis=0)
  return np.asarray([pearson(a, b) for a, b in zip(p, t)])


def diagnose(pred: dict, gt: dict) -> dict:
  """All diagnostics of a prediction against the truth, as a flat dict of floats.

  pred and gt hold view (Nx6), light (Nx4) and canon_depth (NxSxS) in the
  conventions above; gt may hold canon_mask (NxSxS) for the face region.
  Keys: the `view_errors` and `light_errors` keys, depth_sign (of pred) and
  depth_sign_gt, shape_spread (pred), shape_spread_gt and shape_spread_ratio
  (pred / gt: ~1 when shapes vary like the truth, ~0 for a template),
  relief_ratio (`relief_ratio`: how deep the relief is against the truth's), and
  light_intensity (`light_intensity`: ~0 is a black render), view_yaw_std_ratio
  (`yaw_std_ratio`: ~0 is a constant view), shape_corr (the median over images
  of `shape_residual_corr`: how much of each image's own shape, beyond the template, is recovered; 1 perfect, 0 a
  template, -1 inverted) with shape_corr_q25 (its lower quartile).
  Raises ValueError when the counts or canonical sizes differ.
  """
  n = len(gt["view"])
  for k in ("view", "light", "canon_depth"):
    if len(pred[k]) != n:
      raise ValueError(f"pred {k} has {len(pred[k])} entries, ground truth {n}")
  if np.shape(pred["canon_depth"])[1:] != np.shape(gt["canon_depth"])[1:]:
    raise ValueError(f"canonical depth shapes differ: pred {np.shape(pred['canon_depth'])}, "
                     f"ground truth {np.shape(gt['canon_depth'])}")
  out = view_errors(pred["view"], gt["view"])
  out.update(light_errors(pred["light"], gt["light"]))
  out["light_intensity"] = light_intensity(pred["light"])
  out["view_yaw_std_ratio"] = yaw_std_ratio(pred["view"], gt["view"])
  out["depth_sign"] = depth_sign(pred["canon_depth"])
  out["depth_sign_gt"] = depth_sign(gt["canon_depth"])
  region = face_region(gt.get("canon_mask"), np.shape(gt["canon_depth"])[-1])
  out["shape_spread"] = shape_spread(pred["canon_depth"], region)
  out["shape_spread_gt"] = shape_spread(gt["canon_depth"], region)
  out["shape_spread_ratio"] = (out["shape_spread"] / out["shape_spread_gt"]
                               if out["shape_spread_gt"] > 0 else float("nan"))
  out["relief_ratio"] = relief_ratio(pred["canon_depth"], gt["canon_depth"], region)
  corr = shape_residual_corr(pred["canon_depth"], gt["canon_depth"], region)
  corr = corr[np.isfinite(corr)]
  out["shape_corr"] = float(np.median(corr)) if corr.size else float("nan")
  out["shape_corr_q25"] = float(np.quantile(corr, 0.25)) if corr.size else float("nan")
  return out


# Keys worth a glance (the progress line, the benchmark table).
HEADLINE = ("view_yaw_mae_deg", "view_yaw_corr", "view_pitch_offset_deg",
            "view_pitch_mae_deg", "depth_sign", "shape_spread_ratio", "shape_corr")


def headline(diag: dict) -> str:
  """One line: yaw error and correlation, pitch offset and error, depth sign,
  shape spread ratio, per-image shape correlation, and the `fault` if any."""
  kind = fault(diag)
  return (f"yaw err {diag['view_yaw_mae_deg']:.1f} deg (corr {diag['view_yaw_corr']:.2f}), "
          f"pitch offset {diag['view_pitch_offset_deg']:+.1f} err "
          f"{diag['view_pitch_mae_deg']:.1f} deg, convex {diag['depth_sign']:.2f}, "
          f"shape spread x{diag['shape_spread_ratio']:.2f}, "
          f"per-image shape corr {diag.get('shape_corr', float('nan')):.2f}"
          + (f"; FAILED: {kind}" if kind else ""))


# ----------------------------------------------------------------------------
# Running a model
# ----------------------------------------------------------------------------

def evaluate(nets, params, data: dict, structure, cfg, limit=None) -> dict:
  """`diagnose` of the model on a split that carries `data["gt"]` (its first
  `limit` images). Returns the flat dict of floats."""
  n = len(data["images"]) if limit is None else min(limit, len(data["images"]))
  pred = Evaluator(nets, cfg).factors(params, data["images"][:n], structure)
  gt = {k: np.asarray(v)[:n] for k, v in data["gt"].items()}
  return diagnose(pred, gt)


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------

def _depth_tile(d_SxS, region_SxS):
  """Grey depth picture: bright = near, stretched over the region, 0 outside."""
  d = np.asarray(d_SxS, np.float64)
  lo, hi = d[region_SxS].min(), d[region_SxS].max()
  g = np.where(region_SxS, 0.15 + 0.85 * (hi - d) / max(hi - lo, 1e-9), 0.0)
  return np.repeat(g[..., None], 3, -1)


def picture_grid(images_NxSxSx3, pred: dict, gt: dict, cam: render.Camera, path: str,
                 scale: int = 3) -> str:
  """Writes a PNG, one row per image; columns: input, then truth | prediction
  of the canonical depth (grey, bright = near, stretched per tile over the
  face region), normals (RGB), albedo, shading (grey, same scale for both).

  pred: `Evaluator.factors` output; gt: view, light, canon_depth, canon_albedo
  (and canon_mask). Returns path.
  """
  n = len(images_NxSxSx3)
  region = face_region(gt.get("canon_mask"), np.shape(gt["canon_depth"])[-1])
  gt_normal = np.asarray(jax.vmap(lambda d: render.depth_to_normals(d, cam))(
      jnp.asarray(gt["canon_depth"][:n])))
  gl = np.asarray(gt["light"][:n], np.float32)
  gt_shading = np.asarray(jax.vmap(render.shade)(
      jnp.asarray(gt_normal), jnp.asarray(gl[:, 0]), jnp.asarray(gl[:, 1]),
      jnp.asarray(gl[:, 2:4])))
  rows = []
  for i in range(n):
    tiles = [np.asarray(images_NxSxSx3[i], np.float64)]
    tiles += [_depth_tile(gt["canon_depth"][i], region),
              _depth_tile(pred["canon_depth"][i], region)]
    tiles += [visualize.normal_to_rgb(gt_normal[i]), visualize.normal_to_rgb(pred["canon_normal"][i])]
    tiles += [gt["canon_albedo"][i], pred["canon_albedo"][i]]
    # Shading may exceed 1 (ambient + diffuse); one scale for the pair.
    top = max(float(gt_shading[i].max()), float(pred["canon_shading"][i].max()), 1e-6)
    tiles += [np.repeat((s / top)[..., None], 3, -1)
              for s in (gt_shading[i], pred["canon_shading"][i])]
    sep = np.ones((tiles[0].shape[0], 1, 3))
    rows.append(np.concatenate([x for t in tiles for x in (np.asarray(t, np.float64), sep)][:-1],
                               axis=1))
  grid = np.concatenate([x for r in rows for x in (r, np.ones((1, r.shape[1], 3)))][:-1], axis=0)
  visualize.save_png(path, grid, scale)
  return path


GRID_COLUMNS = ("input", "true depth", "pred depth", "true normals", "pred normals",
                "true albedo", "pred albedo", "true shading", "pred shading")
