"""Depth metrics: hand-computed masks and SIDE, analytic MAD, edge cases."""
import jax
import numpy as np
import pytest

from scr_jax import metrics as M
from scr_jax import render as R

# One small non-square camera for most tests: XLA:CPU compiles dominate the
# run time, so tests share shapes (and jitted helpers) where they can.
CAM = R.Camera(12, 10, fov_deg=30.0)
side_jit = jax.jit(M.side)
mask_jit = jax.jit(M.eval_mask)
normals_jit = jax.jit(M.normals, static_argnames="cam")
normals_unsup3d_jit = jax.jit(M.normals_unsup3d, static_argnames="cam")


def ray_dirs(cam):
  """Pixel rays K^-1 [x, y, 1] (z component 1), HxWx3 float64."""
  y, x = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
  return np.stack([(x - cam.cx) / cam.focal, (y - cam.cy) / cam.focal, np.ones_like(x)], -1)


def plane_depth(cam, a, b, c):
  """Depth map of the plane z = a X + b Y + c: on the ray P = z r,
  z = a z r_x + b z r_y + c, so z = c / (1 - a r_x - b r_y)."""
  r = ray_dirs(cam)
  return c / (1.0 - a * r[..., 0] - b * r[..., 1])


def plane_normal(a, b):
  """Unit normal of z = a X + b Y + c in the render convention.

  Tangents along +x (right) and +y (down) on the plane are (1, 0, a) and
  (0, 1, b); their cross product (tu x tv, as in depth_to_normals) is
  (-a, -b, 1): a fronto-parallel plane gets (0, 0, 1).
  """
  n = np.array([-a, -b, 1.0])
  return n / np.linalg.norm(n)


def angle_deg(n1, n2):
  return np.rad2deg(np.arccos(np.clip(np.dot(n1, n2), -1.0, 1.0)))


def ones(x):
  return np.ones(np.shape(x), np.float32)


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def test_erode_hand_drawn():
  mask = np.array([[1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 1],
                   [1, 1, 1, 1, 1, 1],
                   [1, 1, 0, 1, 1, 1],
                   [1, 1, 1, 1, 1, 1]], np.float32)
  # Survivors: interior pixels whose whole 3x3 neighbourhood is 1 (the zero
  # padding removes the image border).
  expected = np.array([[0, 0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 0, 0],
                       [0, 1, 1, 1, 0, 0],
                       [0, 0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(M.erode(mask[None]))[0], expected)


def test_eval_mask_batch_max_and_pred_valid():
  gt = np.ones((2, 5, 5), np.float32)
  gt[0, 0, 0] = 2.0  # image 0: one background pixel at the corner
  mask = np.asarray(mask_jit(ones(gt[:1]), gt[:1]))[0]
  expected = np.zeros((5, 5), np.float32)
  expected[1:4, 1:4] = 1.0
  expected[1, 1] = 0.0  # touches the background corner
  np.testing.assert_array_equal(mask, expected)

  # The max is over the whole batch: image 1's max (1.0) is below 2.0, so all
  # of image 1 counts as foreground.
  mask = np.asarray(mask_jit(ones(gt), gt))
  np.testing.assert_array_equal(mask[0], expected)
  full = np.zeros((5, 5), np.float32)
  full[1:4, 1:4] = 1.0
  np.testing.assert_array_equal(mask[1], full)
  # Evaluated alone, image 1 has no pixel below its own max: empty.
  assert np.asarray(mask_jit(ones(gt[1:]), gt[1:])).sum() == 0
  # ...unless the batch max is given explicitly.
  np.testing.assert_array_equal(np.asarray(mask_jit(ones(gt[1:]), gt[1:], gt_max=2.0))[0],
                                full)

  # An invalid prediction pixel removes itself and its 8 neighbours.
  valid = ones(gt)
  valid[1, 4, 4] = 0.0
  mask = np.asarray(mask_jit(valid, gt))
  np.testing.assert_array_equal(mask[0], expected)
  full_minus = full.copy()
  full_minus[3, 3] = 0.0
  np.testing.assert_array_equal(mask[1], full_minus)


# ----------------------------------------------------------------------------
# SIDE
# ----------------------------------------------------------------------------

def _gt_5x5():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.9, 1.1, (1, 5, 5)).astype(np.float32)
  gt[0, 0, 0] = 1.5  # background -> eroded mask = 3x3 interior minus (1, 1)
  return gt


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.7, 10.0])
def test_side_scale_invariant(scale):
  gt = _gt_5x5()
  mask = mask_jit(ones(gt), gt)
  side_B, valid_B = side_jit(gt * np.float32(scale), gt, mask)
  assert bool(valid_B[0])
  assert float(side_B[0]) < 1e-5


def test_side_hand_computed_noise():
  gt = _gt_5x5()
  mask = np.asarray(mask_jit(ones(gt), gt))
  assert mask.sum() == 8
  noise = np.full((5, 5), 5.0)  # huge outside the mask: must not count
  inside = [0.1, -0.1, 0.1, -0.1, 0.2, -0.2, 0.3, -0.3]
  noise[mask[0] > 0] = inside
  noise += 0.7  # a global log-scale: SIDE ignores it
  # Population std of `inside`: mean 0, mean of squares 0.3 / 8.
  expected = np.sqrt(0.3 / 8)
  pred = (gt * np.exp(noise)).astype(np.float32)
  side_B, _ = side_jit(pred, gt, mask)
  np.testing.assert_allclose(float(side_B[0]), expected, rtol=1e-4)


def test_side_ignores_garbage_outside_mask():
  gt = _gt_5x5()
  pred = gt.copy()
  pred[0, 0, :] = 0.0  # log(0) outside the mask must not leak NaN/inf
  pred[0, 4, 4] = -1.0
  side_B, valid_B = side_jit(pred, gt, mask_jit(ones(gt), gt))
  assert bool(valid_B[0]) and float(side_B[0]) < 1e-5


# ----------------------------------------------------------------------------
# MAD
# ----------------------------------------------------------------------------

def _plane_scene(cam, a, b, c, region=2, background=1.5):
  """gt: the plane (a, b, c) on a central square, background elsewhere."""
  gt = plane_depth(cam, a, b, c)
  inner = np.zeros((cam.height, cam.width), bool)
  inner[region:-region, region:-region] = True
  return np.where(inner, gt, background)[None].astype(np.float32)


def test_mad_perfect_and_global_scale_zero():
  gt = _plane_scene(CAM, 0.3, 0.1, 1.0)
  gt[0, 4:8, 5:8] += np.float32(0.05)  # a bump, so normals are not all equal
  for pred in (gt, gt * np.float32(1.8)):
    out = M.evaluate_depth(pred, ones(pred), gt, CAM)
    assert bool(out["valid"][0])
    assert float(out["mad"][0]) < 1e-3
    assert float(out["side"][0]) < 1e-3


@pytest.mark.parametrize("a,b", [(0.4, -0.25), (0.0, 0.6), (-0.8, 0.3)])
def test_mad_tilted_plane_vs_fronto_parallel(a, b):
  gt = _plane_scene(CAM, 0.0, 0.0, 1.0)
  pred = plane_depth(CAM, a, b, 1.0)[None].astype(np.float32)
  expected = angle_deg(plane_normal(a, b), plane_normal(0.0, 0.0))
  np.testing.assert_allclose(expected, np.rad2deg(np.arccos(1 / np.sqrt(1 + a * a + b * b))))
  # The normals themselves follow the derivation (orientation included).
  n = np.asarray(normals_jit(pred, CAM))[0, 1:-1, 1:-1]
  np.testing.assert_allclose(n, np.broadcast_to(plane_normal(a, b), n.shape), atol=1e-5)
  out = M.evaluate_depth(pred, ones(pred), gt, CAM)
  assert bool(out["valid"][0])
  np.testing.assert_allclose(float(out["mad"][0]), expected, atol=1e-3)


def test_mad_two_tilted_planes():
  (a1, b1), (a2, b2) = (0.5, -0.2), (-0.3, 0.4)
  gt = _plane_scene(CAM, a1, b1, 1.0)
  pred = plane_depth(CAM, a2, b2, 2.0)[None].astype(np.float32)
  out = M.evaluate_depth(pred, ones(pred), gt, CAM)
  expected = angle_deg(plane_normal(a1, b1), plane_normal(a2, b2))
  np.testing.assert_allclose(float(out["mad"][0]), expected, atol=1e-3)
  # The eps-normalised MAD is never below the exact one here.
  assert float(out["mad_unsup3d"][0]) >= float(out["mad"][0])
  # Reported SIDE is the raw one x100.
  side_B, _ = side_jit(pred, gt, mask_jit(ones(pred), gt))
  assert float(side_B[0]) > 1e-3
  np.testing.assert_allclose(float(out["side"][0]), 100 * float(side_B[0]), rtol=1e-5)


def test_mad_unsup3d_floor_at_64px():
  cam = R.Camera(64, 64)  # fov 10, as the synface config
  gt = _plane_scene(cam, 0.0, 0.0, 1.0, region=8, background=1.2)
  out = M.evaluate_depth(gt, ones(gt), gt, cam)
  assert float(out["mad"][0]) < 1e-3
  assert float(out["mad_unsup3d"][0]) > 1.0
  # Fronto-parallel plane at depth 1: raw cross product (2 / f)^2 long, so the
  # eps normal has length s = L / (L + 1e-7) and the angle is arccos(s^2).
  length = (2.0 / cam.focal) ** 2
  s = length / (length + 1e-7)
  np.testing.assert_allclose(float(out["mad_unsup3d"][0]), np.rad2deg(np.arccos(s * s)),
                             atol=0.05)


def test_normals_unsup3d_border_and_length():
  n = np.asarray(normals_unsup3d_jit(np.ones((12, 10), np.float32), CAM))
  np.testing.assert_allclose(n[0, 3], [0.0, 0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(n[5, -1], [0.0, 0.0, 1.0], atol=1e-6)
  length = (2.0 / CAM.focal) ** 2
  np.testing.assert_allclose(n[3, 3], [0.0, 0.0, length / (length + 1e-7)], rtol=1e-4)


# ----------------------------------------------------------------------------
# Empty masks, summary, baselines
# ----------------------------------------------------------------------------

def test_empty_mask_is_nan_invalid_and_skipped():
  gt = np.ones((2, 12, 10), np.float32)
  gt[0, 0, :] = 1.3  # image 0 has background; image 1 is all at the batch max
  gt[1] = 1.3
  out = M.evaluate_depth(gt * np.float32(0.9), ones(gt), gt, CAM)
  assert list(np.asarray(out["valid"])) == [True, False]
  for k in ("side", "mad", "mad_unsup3d"):
    assert np.isfinite(out[k][0]) and np.isnan(out[k][1])
  s = M.summarize(out)
  assert s["n"] == 1 and s["n_skipped"] == 1
  assert np.isfinite(s["side_mean"]) and np.isfinite(s["mad_std"])

  none = M.summarize({k: v[1:] for k, v in out.items()})
  assert none["n"] == 0 and none["n_skipped"] == 1 and np.isnan(none["mad_mean"])


def test_summarize_list_population_std():
  b1 = dict(side=np.array([1.0, 3.0]), mad=np.array([10.0, 20.0]),
            mad_unsup3d=np.array([11.0, 21.0]), valid=np.array([True, True]))
  b2 = dict(side=np.array([np.nan, 5.0]), mad=np.array([np.nan, 30.0]),
            mad_unsup3d=np.array([np.nan, 31.0]), valid=np.array([False, True]))
  s = M.summarize([b1, b2])
  assert s["n"] == 3 and s["n_skipped"] == 1
  np.testing.assert_allclose(s["side_mean"], 3.0)
  np.testing.assert_allclose(s["side_std"], np.sqrt(8.0 / 3.0))  # ddof 0
  np.testing.assert_allclose(s["mad_mean"], 20.0)
  np.testing.assert_allclose(s["mad_unsup3d_mean"], 21.0)
  np.testing.assert_allclose(s["mad_unsup3d_std"], np.sqrt(200.0 / 3.0))


def test_batching_with_fixed_gt_max_matches_whole_batch():
  rng = np.random.default_rng(1)
  gt = rng.uniform(0.95, 1.05, (2, 12, 10)).astype(np.float32)
  gt[:1, :, :2] = 1.2  # only the first image has background
  pred = (gt * np.exp(0.02 * rng.standard_normal(gt.shape))).astype(np.float32)
  whole = M.evaluate_depth(pred, ones(pred), gt, CAM)
  parts = [M.evaluate_depth(pred[i:i + 1], ones(pred[i:i + 1]), gt[i:i + 1], CAM,
                            gt_max=1.2) for i in (0, 1)]
  for k in ("side", "mad", "mad_unsup3d", "valid"):
    np.testing.assert_allclose(np.concatenate([np.asarray(p[k]) for p in parts]),
                               np.asarray(whole[k]), rtol=1e-5)
  # Without it, the second image (no background) would lose its max pixel's
  # neighbourhood to the batch-max rule.
  alone = M.evaluate_depth(pred[1:], ones(pred[1:]), gt[1:], CAM)
  assert 0 < float(alone["n_pixels"][0]) < float(whole["n_pixels"][1])


def test_evaluate_depth_checks_shapes_and_traces_under_jit():
  gt = _plane_scene(CAM, 0.2, 0.1, 1.0)
  with pytest.raises(ValueError, match="pred must be"):
    M.evaluate_depth(gt[:, :, :-1], ones(gt), gt, CAM)
  # Traceable inside a caller's jit, with a traced gt_max.
  f = jax.jit(lambda p, g, m: M.evaluate_depth(p, ones(p), g, CAM, gt_max=m)["mad"])
  pred = plane_depth(CAM, 0.0, 0.0, 1.0)[None].astype(np.float32)
  np.testing.assert_allclose(float(f(pred, gt, np.float32(1.5))[0]),
                             angle_deg(plane_normal(0.2, 0.1), plane_normal(0, 0)), atol=1e-3)


def test_constant_baseline():
  a, b = 0.4, -0.3
  gt = _plane_scene(CAM, a, b, 1.0)
  gt[0, 5, 5] *= np.float32(1.03)  # nonzero SIDE for a constant prediction
  outs = []
  for value in (1.0, 2.5):
    pred = M.constant_depth_baseline(gt, value)
    assert pred.shape == gt.shape and np.all(np.asarray(pred) == value)
    outs.append(M.evaluate_depth(pred, ones(pred), gt, CAM))
  assert float(outs[0]["side"][0]) > 0.1
  np.testing.assert_allclose(float(outs[0]["side"][0]), float(outs[1]["side"][0]), rtol=1e-5)
  # Constant depth has normals (0, 0, 1): MAD = the plane's tilt, away from the bump.
  gt_plane = _plane_scene(CAM, a, b, 1.0)
  out = M.evaluate_depth(M.constant_depth_baseline(gt_plane), ones(gt_plane), gt_plane, CAM)
  np.testing.assert_allclose(float(out["mad"][0]),
                             angle_deg(plane_normal(a, b), plane_normal(0, 0)), atol=1e-3)


def test_average_baseline():
  train = np.stack([np.full((3, 4), 1.0), np.full((3, 4), 2.0),
                    np.arange(12.0).reshape(3, 4)]).astype(np.float32)
  avg = np.asarray(M.average_depth_baseline(train))
  np.testing.assert_allclose(avg, (3.0 + np.arange(12.0).reshape(3, 4)) / 3.0, rtol=1e-6)
  assert avg.shape == (3, 4)
