"""Slow, obviously-correct references for the rasterizer (tests, benchmarks).

Not part of the package: `experiments/bench_render.py` imports it as its
sibling, tests as `from experiments import render_reference` (pytest.ini puts
the repo root on the path).

* `rasterize_numpy`: float64 NumPy, one face at a time against the pixels of
  its bounding box, explicit z-buffer. Shares no code with `render.rasterize`.
* `rasterize_brute_jax`: every face against every pixel (chunked over faces),
  no windows, no tiers; float32 like the fast path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import model, render


def rasterize_numpy(tri_3x3xF, height: int, width: int, face_valid_F=None,
                    inside_tol: float = render.INSIDE_TOL):
  """Returns (depth_HxW float64 with inf where uncovered, face_id_HxW int)."""
  tri = np.asarray(tri_3x3xF, np.float64)
  zbuf = np.full((height, width), np.inf)
  ids = np.full((height, width), -1, np.int64)
  valid = np.ones(tri.shape[-1], bool) if face_valid_F is None else np.asarray(face_valid_F)
  for f in range(tri.shape[-1]):
    (u0, v0, z0), (u1, v1, z1), (u2, v2, z2) = tri[:, :, f]
    if not valid[f] or not np.all(np.isfinite(tri[:, :, f])) or min(z0, z1, z2) <= 1e-3:
      continue
    area = (u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0)
    if abs(area) <= 1e-9:
      continue
    xa = max(int(np.floor(min(u0, u1, u2))) - 1, 0)
    xb = min(int(np.ceil(max(u0, u1, u2))) + 1, width - 1)
    ya = max(int(np.floor(min(v0, v1, v2))) - 1, 0)
    yb = min(int(np.ceil(max(v0, v1, v2))) + 1, height - 1)
    if xa > xb or ya > yb:
      continue
    py, px = np.mgrid[ya:yb + 1, xa:xb + 1].astype(np.float64)
    w0 = ((u1 - px) * (v2 - py) - (v1 - py) * (u2 - px)) / area
    w1 = ((u2 - px) * (v0 - py) - (v2 - py) * (u0 - px)) / area
    w2 = 1.0 - w0 - w1
    inside = (w0 >= -inside_tol) & (w1 >= -inside_tol) & (w2 >= -inside_tol)
    z = 1.0 / (w0 / z0 + w1 / z1 + w2 / z2)
    sub_z = zbuf[ya:yb + 1, xa:xb + 1]
    better = inside & (z < sub_z)
    sub_z[better] = z[better]
    ids[ya:yb + 1, xa:xb + 1][better] = f
  return zbuf, ids


def rasterize_brute_jax(tri_3x3xF, height: int, width: int, face_valid_F=None,
                        chunk: int = 256):
  """Every face against every pixel centre. Returns face_id_HxW (-1 uncovered)."""
  tri = jax.lax.stop_gradient(tri_3x3xF)
  num_faces = tri.shape[-1]
  valid = jnp.ones(num_faces, bool) if face_valid_F is None else face_valid_F
  ok, _ = render._face_data(tri, height, width, valid)  # same validity rules
  pad = -num_faces % chunk
  tri = jnp.pad(tri, ((0, 0), (0, 0), (0, pad)), constant_values=1.0)
  ok = jnp.pad(ok, (0, pad))
  gx, gy = render.pixel_grid(render.Camera(height, width))
  gx, gy = gx.ravel(), gy.ravel()

  def one_chunk(c):
    sl = jax.lax.dynamic_slice_in_dim(tri, c * chunk, chunk, axis=2)
    okc = jax.lax.dynamic_slice_in_dim(ok, c * chunk, chunk)
    w, z = render.barycentric(sl[:, :, :, None], gx, gy)
    z = jnp.where(okc[:, None] & render._inside(w), z, jnp.inf)
    return jnp.min(z, 0), c * chunk + jnp.argmin(z, 0).astype(jnp.int32)

  zs, ids = jax.lax.map(one_chunk, jnp.arange((num_faces + pad) // chunk))
  best = jnp.argmin(zs, 0)
  z = jnp.take_along_axis(zs, best[None], 0)[0]
  fid = jnp.take_along_axis(ids, best[None], 0)[0]
  return jnp.where(jnp.isfinite(z), fid, -1).reshape(height, width)


def warp_depth_reference(canon_depth_HxW, view_6, cam: render.Camera, face_valid_F=None):
  """float64 NumPy version of `render.warp_depth`: (depth_HxW, covered_HxW)."""
  d = np.asarray(canon_depth_HxW, np.float64)
  view = np.asarray(view_6, np.float64)
  y, x = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
  pts = np.stack([(x - cam.cx) / cam.focal * d, (y - cam.cy) / cam.focal * d, d], -1)
  rx, ry, rz = view[:3]
  Rx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
  Ry = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
  Rz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
  c = np.array([0.0, 0.0, cam.rot_center_depth])
  p = (pts.reshape(-1, 3) - c) @ (Rz @ Ry @ Rx).T + c + view[3:6]
  uvz = np.stack([cam.focal * p[:, 0] / p[:, 2] + cam.cx,
                  cam.focal * p[:, 1] / p[:, 2] + cam.cy, p[:, 2]], -1)
  faces = render.grid_faces(cam.height, cam.width)
  tri = np.transpose(uvz[faces], (1, 2, 0))
  z, ids = rasterize_numpy(tri, cam.height, cam.width, face_valid_F)
  covered = ids >= 0
  z = np.clip(np.where(covered, z, cam.far), cam.near, cam.far)
  return z, covered


def limit_factors(cam, views):
  """Factors at the limits the heads can emit, for fault checks (tests and
  tests/test_faults.py): every combination of three canonical depths
  (all min_depth, all max_depth, a min/max checkerboard) with `views`
  (list of 6-vectors: rx, ry, rz in radians, tx, ty, tz), and extreme
  albedo (-1 / 1), ambient / diffuse (0 / 1) and light directions (+-1).
  Returns a model.Factors with B = 3 * len(views) and S = cam.width."""
  s = cam.width
  alt = np.where(np.add.outer(np.arange(s), np.arange(s)) % 2, cam.min_depth, cam.max_depth)
  depths = [np.full((s, s), cam.min_depth), np.full((s, s), cam.max_depth), alt]
  combos = [(d, v) for d in depths for v in views]
  n = len(combos)
  return model.Factors(
      depth_BxSxS=jnp.asarray(np.stack([d for d, _ in combos]), jnp.float32),
      albedo_BxSxSx3=jnp.asarray(np.resize([-1.0, 1.0], (n, s, s, 3)), jnp.float32),
      ambient_B=jnp.asarray(np.resize([0.0, 1.0], n), jnp.float32),
      diffuse_B=jnp.asarray(np.resize([1.0, 0.0], n), jnp.float32),
      light_dxy_Bx2=jnp.asarray(np.resize([[1.0, -1.0], [-1.0, 1.0]], (n, 2)), jnp.float32),
      view_Bx6=jnp.asarray(np.stack([np.asarray(v, np.float64) for _, v in combos]),
                           jnp.float32))
