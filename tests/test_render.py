"""Renderer: analytic cases, exact agreement with slow references, gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scr_jax import render as R
from experiments import render_reference as RR


def ray_dirs(cam):
  y, x = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
  return np.stack([(x - cam.cx) / cam.focal, (y - cam.cy) / cam.focal, np.ones_like(x)], -1)


def plane_depth(cam, normal, point):
  """Depth (z) where each pixel ray hits the plane n.(P - p) = 0."""
  r = ray_dirs(cam)
  return (np.dot(normal, point)) / (r @ normal)


def sphere_depth(cam, center, radius):
  """Depth of the near intersection of pixel rays with a sphere."""
  r = ray_dirs(cam)
  a = np.sum(r * r, -1)
  b = -2 * r @ center
  c = center @ center - radius**2
  t = (-b - np.sqrt(b * b - 4 * a * c)) / (2 * a)
  return t  # r_z = 1, so t is the depth


def bumpy_depth(rng, size, step=True):
  x = np.linspace(-1, 1, size)
  X, Y = np.meshgrid(x, x)
  d = 1.0 + 0.03 * np.sin(3 * X + rng.uniform(0, 6)) * np.cos(2 * Y + rng.uniform(0, 6))
  d += 0.01 * rng.standard_normal((size, size))
  if step:  # a depth discontinuity: stretched faces under rotation
    d += 0.06 * (X > rng.uniform(-0.5, 0.5)) - 0.05 * ((Y - 0.2) ** 2 + X**2 < 0.1)
  return np.clip(d, 0.9, 1.1).astype(np.float32)


warp = jax.jit(R.warp_depth, static_argnums=2)


@pytest.mark.parametrize("size", [8, 17, 32])
def test_identity_view_reproduces_depth(size):
  cam = R.Camera(size, size)
  d = bumpy_depth(np.random.default_rng(size), size)
  z, cov = warp(d, jnp.zeros(6), cam)
  assert bool(jnp.all(cov))
  np.testing.assert_allclose(z, d, atol=2e-6)


@pytest.mark.parametrize("yaw_deg,pitch_deg", [(0, 0), (25, 0), (-40, 10), (15, -20)])
def test_plane_analytic(yaw_deg, pitch_deg):
  cam = R.Camera(24, 24)
  d0 = plane_depth(cam, np.array([0.3, -0.2, 1.0]), np.array([0, 0, 1.0]))  # tilted plane
  view = np.array([np.deg2rad(pitch_deg), np.deg2rad(yaw_deg), 0.05, 0.004, -0.003, 0.0])
  z, cov = warp(d0.astype(np.float32), view.astype(np.float32), cam)
  # The same plane moved by P' = R(P - c) + c + t.
  rot = np.asarray(R.rotation_matrix(jnp.asarray(view[:3])), np.float64)
  c = np.array([0, 0, cam.rot_center_depth])
  n1 = rot @ np.array([0.3, -0.2, 1.0])
  p1 = rot @ (np.array([0, 0, 1.0]) - c) + c + view[3:]
  expect = plane_depth(cam, n1, p1)
  cov = np.asarray(cov)
  assert cov.mean() > 0.5
  np.testing.assert_allclose(np.asarray(z)[cov], expect[cov], atol=2e-5)
  # Coverage = pixels whose ray hits the plane inside the moved mesh's outline:
  # map view hits back to canonical pixel coordinates and check the range.
  hit = ray_dirs(cam) * expect[..., None]
  back = (hit - view[3:] - c) @ rot + c
  u = cam.focal * back[..., 0] / back[..., 2] + cam.cx
  v = cam.focal * back[..., 1] / back[..., 2] + cam.cy
  inside = (u > 1e-3) & (u < cam.width - 1 - 1e-3) & (v > 1e-3) & (v < cam.height - 1 - 1e-3)
  outside = (u < -1e-3) | (u > cam.width - 1 + 1e-3) | (v < -1e-3) | (v > cam.height - 1 + 1e-3)
  assert np.all(cov[inside]) and not np.any(cov[outside])


@pytest.mark.parametrize("yaw_deg", [0, 12, -20])
def test_sphere_about_pivot_is_invariant(yaw_deg):
  """A sphere centred on the pivot looks the same from every rotation."""
  cam = R.Camera(32, 32)
  center = np.array([0, 0, cam.rot_center_depth])
  d0 = sphere_depth(cam, center, 0.15)  # every pixel ray hits it
  view = np.array([0.0, np.deg2rad(yaw_deg), 0.0, 0, 0, 0], np.float32)
  z, cov = warp(d0.astype(np.float32), view, cam)
  cov = np.asarray(cov)
  # the visible cap spans ~±30 degrees of the sphere: rotated, most stays in view
  assert cov[8:24, 12:20].all() and cov.mean() > 0.5
  # The mesh is made of chords of the sphere, so it lies inside it: seen from
  # outside it is never nearer than the sphere, and only chord-sag farther.
  z = np.asarray(z)
  assert np.all(z[cov] >= d0[cov] - 1e-6)
  np.testing.assert_allclose(z[cov], d0[cov], atol=3e-4)


@pytest.mark.parametrize("seed", range(6))
def test_matches_float64_reference_on_bumpy_meshes(seed):
  rng = np.random.default_rng(100 + seed)
  size = [16, 24, 32][seed % 3]
  cam = R.Camera(size, size)
  d = bumpy_depth(rng, size)
  yaw = np.deg2rad([-60, -35, -10, 10, 35, 60][seed])
  view = np.array([rng.uniform(-.3, .3), yaw, rng.uniform(-.2, .2),
                   rng.uniform(-.02, .02), rng.uniform(-.02, .02), 0], np.float32)
  z, cov = warp(d, view, cam)
  zr, covr = RR.warp_depth_reference(d, view, cam)
  np.testing.assert_array_equal(np.asarray(cov), covr)
  np.testing.assert_allclose(np.asarray(z), zr, atol=1e-5, rtol=0)


def _tri(d, view, cam):
  pts = R.depth_to_points(jnp.asarray(d), cam).reshape(-1, 3)
  uvz = R.project(R.transform_points(pts, jnp.asarray(view), cam), cam)
  return R.grid_triangles(uvz.T.reshape(3, cam.height, cam.width))


@pytest.mark.parametrize("seed", range(4))
def test_tiers_match_brute_force(seed):
  """Window, mid and dense tiers together equal all-faces-against-all-pixels."""
  rng = np.random.default_rng(seed)
  cam = R.Camera(24, 24)
  d = bumpy_depth(rng, 24) + (0.05 * rng.standard_normal((24, 24))).astype(np.float32)
  view = np.array([0.2, rng.uniform(-1.0, 1.0), 0.1, 0, 0, 0], np.float32)
  tri = _tri(d, view, cam)
  fid, num_dense = jax.jit(R.rasterize, static_argnums=(1, 2))(tri, 24, 24)
  ref = RR.rasterize_brute_jax(tri, 24, 24)
  assert int(num_dense) > 0  # the case exercises the dense path
  faces = R.grid_faces(24, 24)
  uvz_flat = jnp.transpose(tri, (2, 0, 1))  # unused shape check
  assert uvz_flat.shape[0] == faces.shape[0]
  np.testing.assert_array_equal(np.asarray(fid) >= 0, np.asarray(ref) >= 0)
  # ids may differ on exact ties (shared edges); depths must not
  pts = R.depth_to_points(jnp.asarray(d), cam).reshape(-1, 3)
  uvz = R.project(R.transform_points(pts, jnp.asarray(view), cam), cam)
  za = R.interpolate_depth(uvz, faces, fid, cam)
  zb = R.interpolate_depth(uvz, faces, ref, cam)
  np.testing.assert_allclose(za, zb, atol=1e-6)


def test_tiny_windows_force_every_tier():
  """Shrinking the windows moves faces between tiers without changing output."""
  rng = np.random.default_rng(7)
  cam = R.Camera(20, 20)
  d = bumpy_depth(rng, 20)
  tri = _tri(d, np.array([0.1, 0.7, 0, 0, 0, 0], np.float32), cam)
  outs = [jax.jit(functools.partial(R.rasterize, height=20, width=20, windows=w, chunks=c))(tri)[0]
          for w, c in [((2, 6), (256, 32)), ((1, 2), (7, 5)), ((1, 1), (3, 3)), ((4, 8), (64, 64))]]
  for o in outs[1:]:
    np.testing.assert_array_equal(np.asarray(o) >= 0, np.asarray(outs[0]) >= 0)


def test_face_valid_mask_drops_faces():
  cam = R.Camera(12, 12)
  d = np.full((12, 12), 1.0, np.float32)
  valid = np.ones(2 * 11 * 11, bool)
  valid[:11 * 11] = False  # first triangle of every quad
  z, cov = jax.jit(functools.partial(R.warp_depth, cam=cam))(
      d, jnp.zeros(6), face_valid_F=jnp.asarray(valid))
  zr, covr = RR.warp_depth_reference(d, np.zeros(6), cam, face_valid_F=valid)
  np.testing.assert_array_equal(np.asarray(cov), covr)
  assert covr.sum() < 12 * 12
  np.testing.assert_allclose(np.asarray(z), zr, atol=1e-6)


def _interior(cov, k=2):
  """Covered pixels at least k pixels from the silhouette (coverage there is
  stable under small perturbations, so the loss is smooth)."""
  c = np.asarray(cov, bool)
  out = c.copy()
  for dy in range(-k, k + 1):
    for dx in range(-k, k + 1):
      out &= np.roll(np.roll(c, dy, 0), dx, 1)
  out[:k], out[-k:], out[:, :k], out[:, -k:] = False, False, False, False
  return jnp.asarray(out, jnp.float32)


def _fd_check(fn, x, rng, eps, rtol):
  """Central differences along random directions (call under float64)."""
  fn = jax.jit(fn)
  g = jax.jit(jax.grad(fn))(x)
  for _ in range(3):
    v = jnp.asarray(rng.standard_normal(x.shape))
    fd = (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)
    an = jnp.vdot(g, v)
    np.testing.assert_allclose(float(an), float(fd), rtol=rtol, atol=1e-4)


@jax.enable_x64(True)
def test_gradients_match_finite_differences():
  rng = np.random.default_rng(0)
  cam = R.Camera(16, 16)
  x = np.linspace(-1, 1, 16)
  X, Y = np.meshgrid(x, x)
  d = jnp.asarray(1.0 - 0.03 * np.exp(-(X**2 + Y**2) * 2))
  view = jnp.asarray([0.05, 0.3, 0.02, 0.003, -0.002, 0.01])
  wts = jnp.asarray(rng.uniform(0.5, 1.5, (16, 16)))
  wts = wts * _interior(warp(d, view, cam)[1])
  loss_d = lambda dd: jnp.sum(wts * R.warp_depth(dd, view, cam)[0])
  loss_v = lambda vv: jnp.sum(wts * R.warp_depth(d, vv, cam)[0])
  _fd_check(loss_d, d, rng, 1e-6, 1e-5)
  _fd_check(loss_v, view, rng, 1e-6, 1e-5)
  # gradients are non-trivial and finite
  assert float(jnp.abs(jax.grad(loss_v)(view)).max()) > 1e-3
  assert bool(jnp.all(jnp.isfinite(jax.grad(loss_d)(d))))


@jax.enable_x64(True)
def test_image_render_gradients_match_finite_differences():
  rng = np.random.default_rng(1)
  cam = R.Camera(12, 12)
  d = jnp.asarray(bumpy_depth(rng, 12, step=False), jnp.float64)
  img = jnp.asarray(rng.uniform(0, 1, (12, 12, 3)))
  # smooth image: bilinear sampling is only piecewise smooth
  img = jax.image.resize(jax.image.resize(img, (4, 4, 3), "linear"), (12, 12, 3), "linear")
  view0 = jnp.asarray([0.02, 0.2, 0.0, 0.0, 0.0, 0.0])
  inner = _interior(warp(d, view0, cam)[1])

  def loss(vv):
    depth, _ = R.warp_depth(d, vv, cam)
    return jnp.sum(inner[..., None] * R.grid_sample(img, R.inverse_warp_grid(depth, vv, cam)) ** 2)

  _fd_check(loss, view0, rng, 1e-6, 1e-4)


def test_jit_and_vmap_agree_with_single():
  rng = np.random.default_rng(3)
  cam = R.Camera(16, 16)
  ds = np.stack([bumpy_depth(rng, 16) for _ in range(3)])
  vs = np.array([[0, 0.5 * i - 0.5, 0, 0, 0, 0] for i in range(3)], np.float32)
  zb, cb = jax.jit(jax.vmap(functools.partial(R.warp_depth, cam=cam)))(ds, vs)
  single = jax.jit(functools.partial(R.warp_depth, cam=cam))
  for i in range(3):
    z, c = single(ds[i], vs[i])
    np.testing.assert_allclose(zb[i], z, atol=1e-6)
    np.testing.assert_array_equal(cb[i], c)


def test_grid_sample_matches_numpy_bilinear():
  rng = np.random.default_rng(5)
  img = rng.uniform(size=(5, 7, 2)).astype(np.float32)
  grid = rng.uniform(-1.5, 7.5, size=(4, 3, 2)).astype(np.float32)
  out = np.asarray(jax.jit(R.grid_sample)(jnp.asarray(img), jnp.asarray(grid)))
  for i in range(4):
    for j in range(3):
      x, y = grid[i, j]
      acc = np.zeros(2)
      for yy in (int(np.floor(y)), int(np.floor(y)) + 1):
        for xx in (int(np.floor(x)), int(np.floor(x)) + 1):
          wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
          if 0 <= xx < 7 and 0 <= yy < 5:
            acc += wgt * img[yy, xx]
      np.testing.assert_allclose(out[i, j], acc, atol=1e-5)
  # integer grid reproduces the image (align_corners=True semantics)
  y, x = np.mgrid[0:5, 0:7].astype(np.float32)
  same = R.grid_sample(jnp.asarray(img), jnp.stack([jnp.asarray(x), jnp.asarray(y)], -1))
  np.testing.assert_allclose(same, img, atol=1e-6)


@jax.jit
def _round_trip(d, view):
  cam = R.Camera(24, 24)
  zv, cov = R.warp_depth(d, view, cam)
  grid = R.inverse_warp_grid(zv, view, cam)
  sampled = R.grid_sample(d[..., None], grid)[..., 0]
  back = R.inverse_transform_points(R.depth_to_points(zv, cam).reshape(-1, 3), view, cam)
  return cov, grid, sampled, back.reshape(24, 24, 3)


def test_inverse_warp_round_trip():
  """Rendering the canonical image into a view and sampling it back agrees."""
  cam = R.Camera(24, 24)
  d = jnp.asarray(plane_depth(cam, np.array([0.1, 0.0, 1.0]), np.array([0, 0, 1.0])).astype(np.float32))
  view = jnp.asarray([0.0, 0.3, 0.0, 0, 0, 0], jnp.float32)
  # back-projecting the view depth and undoing the view lands on the canonical surface
  cov, grid, sampled, back = (np.asarray(a) for a in _round_trip(d, view))
  gx, gy = grid[..., 0], grid[..., 1]
  inner = cov & (gx > 0) & (gx < 23) & (gy > 0) & (gy < 23)
  np.testing.assert_allclose(sampled[inner], back[..., 2][inner], atol=1e-4)


def test_normals_and_shading_analytic():
  cam = R.Camera(16, 16)
  n_true = np.array([0.3, -0.2, 1.0])
  d = plane_depth(cam, n_true, np.array([0, 0, 1.0])).astype(np.float32)
  n = np.asarray(R.depth_to_normals(jnp.asarray(d), cam))
  unit = n_true / np.linalg.norm(n_true)
  np.testing.assert_allclose(n[1:-1, 1:-1], np.broadcast_to(unit, (14, 14, 3)), atol=1e-4)
  np.testing.assert_allclose(n[0, 0], [0, 0, 1])
  # frontal plane, light straight on: ambient + diffuse
  flat = R.depth_to_normals(jnp.ones((16, 16)), cam)
  s = R.shade(flat, 0.2, 0.7, jnp.zeros(2))
  np.testing.assert_allclose(s, 0.9, atol=1e-6)
  # light at 60 degrees: diffuse * cos(60)
  s = R.shade(flat, 0.0, 1.0, jnp.asarray([np.tan(np.deg2rad(60)), 0.0]))
  np.testing.assert_allclose(s, 0.5, atol=1e-5)
  # light from behind: ambient only (max(0, n.l))
  s = R.shade(flat, 0.1, 1.0, jnp.asarray([1e3, 0.0]))
  assert float(jnp.max(s)) < 0.1 + 2e-3


def test_degenerate_inputs_stay_finite():
  cam = R.Camera(12, 12)
  cases = [np.full((12, 12), cam.min_depth), np.full((12, 12), cam.max_depth),
           np.where(np.arange(144).reshape(12, 12) % 2, 0.9, 1.1)]
  views = [np.zeros(6), np.array([1.5, 1.5, 1.5, 0.5, 0.5, 0.0]), np.array([0, np.pi / 2, 0, 0, 0, 0])]
  f = jax.jit(jax.value_and_grad(lambda dd, vv: jnp.sum(R.warp_depth(dd, vv, cam)[0]),
                                 argnums=(0, 1)))
  for d in cases:
    for v in views:
      val, (gd, gv) = f(
          jnp.asarray(d, jnp.float32), jnp.asarray(v, jnp.float32))
      assert np.isfinite(float(val))
      assert bool(jnp.all(jnp.isfinite(gd))) and bool(jnp.all(jnp.isfinite(gv)))


def test_camera_validation():
  with pytest.raises(ValueError):
    R.Camera(1, 5)
  with pytest.raises(ValueError):
    R.Camera(8, 8, min_depth=1.2, max_depth=1.1)
  cam = R.Camera(64, 64)
  assert abs(cam.focal - 31.5 / np.tan(np.deg2rad(5))) < 1e-9
  assert cam.far == pytest.approx(1.2) and cam.near == pytest.approx(0.8)
