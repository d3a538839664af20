"""Pure-JAX differentiable renderer for depth-map meshes (the Unsup3D camera).

Conventions (kept identical everywhere in the project):
  * Pixel (x, y) = (column, row); pixel centres sit at integer coordinates,
    the principal point at ((W-1)/2, (H-1)/2), f = (W-1)/2/tan(fov/2).
  * Camera frame: x right, y down, z forward (depth). A depth map holds z.
  * view_6 = (rx, ry, rz, tx, ty, tz): rotations in radians, R = Rz Ry Rx about
    the pivot c = (0, 0, rot_center_depth): P' = R (P - c) + c + t.
  * Normals follow Unsup3D: n = normalize(dP/dx x dP/dy), so a fronto-parallel
    plane has n = (0, 0, 1); light directions are (lx, ly, 1) normalised.

Every function works on ONE image; `jax.vmap` adds the batch axis.

Rasterization = visibility (non-differentiable, exact z-buffer) + re-interpolation
of the winning triangle (differentiable), as neural_renderer does for Unsup3D.
Visibility is exact for triangles of any size: triangles whose pixel bounding
box fits a small window are scattered window-wise; all others go through a
dense pass against every pixel, in chunks, in a `lax.while_loop`, so none is
ever dropped.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# A pixel centre counts as inside a triangle when all barycentrics >= -INSIDE_TOL.
# Pixel centres coincide with mesh vertices under the identity view, so a
# small tolerance keeps those pixels (and the image border) covered.
INSIDE_TOL = 1e-4
_MIN_AREA = 1e-9  # twice the signed screen area (px^2) below which a face is skipped
_NEAR = 1e-3  # vertices closer than this to the camera plane invalidate a face


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera of Unsup3D: square pixels, principal point at the centre."""
  height: int
  width: int
  fov_deg: float = 10.0
  min_depth: float = 0.9
  max_depth: float = 1.1
  rot_center_depth: float = 1.0

  def __post_init__(self):
    if self.height < 2 or self.width < 2:
      raise ValueError(f"camera needs at least 2x2 pixels, got {self.height}x{self.width}")
    if not 0.0 < self.fov_deg < 180.0:
      raise ValueError(f"fov_deg must be in (0, 180), got {self.fov_deg}")
    if not 0.0 < self.min_depth < self.max_depth:
      raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")

  @property
  def focal(self) -> float:
    return (self.width - 1) / 2.0 / np.tan(np.deg2rad(self.fov_deg) / 2.0)

  @property
  def cx(self) -> float:
    return (self.width - 1) / 2.0

  @property
  def cy(self) -> float:
    return (self.height - 1) / 2.0

  @property
  def margin(self) -> float:
    return (self.max_depth - self.min_depth) / 2.0

  @property
  def far(self) -> float:
    """Depth given to pixels no surface covers (Unsup3D's clamp limit)."""
    return self.max_depth + self.margin

  @property
  def near(self) -> float:
    return self.min_depth - self.margin

  @property
  def border_depth(self) -> float:
    return 0.7 * self.max_depth + 0.3 * self.min_depth


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------

def pixel_grid(cam: Camera):
  """Returns (x_HxW, y_HxW) float pixel-centre coordinates."""
  y, x = jnp.meshgrid(jnp.arange(cam.height, dtype=jnp.float32),
                      jnp.arange(cam.width, dtype=jnp.float32), indexing="ij")
  return x, y


def depth_to_points(depth_HxW, cam: Camera):
  """Back-projects a depth map: P = z * K^-1 [x, y, 1]. Returns HxWx3."""
  x, y = pixel_grid(cam)
  px = (x - cam.cx) / cam.focal * depth_HxW
  py = (y - cam.cy) / cam.focal * depth_HxW
  return jnp.stack([px, py, depth_HxW], axis=-1)


def project(pts_Nx3, cam: Camera):
  """Pinhole projection. Returns (u, v, z) with u, v in pixel coordinates."""
  z = pts_Nx3[..., 2]
  u = cam.focal * pts_Nx3[..., 0] / z + cam.cx
  v = cam.focal * pts_Nx3[..., 1] / z + cam.cy
  return jnp.stack([u, v, z], axis=-1)


def rotation_matrix(angles_3):
  """R = Rz(rz) @ Ry(ry) @ Rx(rx) for angles (rx, ry, rz) in radians."""
  rx, ry, rz = angles_3[0], angles_3[1], angles_3[2]
  one, zero = jnp.ones_like(rx), jnp.zeros_like(rx)
  cx_, sx = jnp.cos(rx), jnp.sin(rx)
  cy_, sy = jnp.cos(ry), jnp.sin(ry)
  cz, sz = jnp.cos(rz), jnp.sin(rz)
  Rx = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, cx_, -sx]),
                  jnp.stack([zero, sx, cx_])])
  Ry = jnp.stack([jnp.stack([cy_, zero, sy]), jnp.stack([zero, one, zero]),
                  jnp.stack([-sy, zero, cy_])])
  Rz = jnp.stack([jnp.stack([cz, -sz, zero]), jnp.stack([sz, cz, zero]),
                  jnp.stack([zero, zero, one])])
  return Rz @ Ry @ Rx


def transform_points(pts_Nx3, view_6, cam: Camera):
  """Canonical frame -> view: P' = R (P - c) + c + t."""
  R = rotation_matrix(view_6[:3])
  c = jnp.array([0.0, 0.0, cam.rot_center_depth], jnp.float32)
  return (pts_Nx3 - c) @ R.T + c + view_6[3:6]


def inverse_transform_points(pts_Nx3, view_6, cam: Camera):
  """View -> canonical frame: P = R^T (P' - t - c) + c."""
  R = rotation_matrix(view_6[:3])
  c = jnp.array([0.0, 0.0, cam.rot_center_depth], jnp.float32)
  return (pts_Nx3 - view_6[3:6] - c) @ R + c


@functools.lru_cache(maxsize=None)
def grid_faces(height: int, width: int) -> np.ndarray:
  """Faces of the depth-map mesh: 2(H-1)(W-1) x 3 vertex ids (tl,bl,tr), (tr,bl,br)."""
  idx = np.arange(height * width, dtype=np.int32).reshape(height, width)
  tl, tr = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
  bl, br = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
  f1 = np.stack([tl, bl, tr], axis=1)
  f2 = np.stack([tr, bl, br], axis=1)
  faces = np.concatenate([f1, f2], axis=0)
  faces.setflags(write=False)
  return faces


# ----------------------------------------------------------------------------
# Rasterization
# ----------------------------------------------------------------------------

def barycentric(tri_3x3xN, px, py):
  """Screen-space barycentrics and perspective-correct depth of points.

  tri_3x3xN: [3 vertices, 3 (u, v, z), ...] (structure-of-arrays: XLA:CPU
  vectorises contiguous planes, not interleaved xyz); px, py broadcast against
  the trailing shape. Returns ((w0, w1, w2), z). w sums to 1;
  z = 1 / sum_i w_i / z_i is the exact depth of the face's plane on the ray.
  """
  (u0, v0, z0), (u1, v1, z1), (u2, v2, z2) = tri_3x3xN
  e0 = (u1 - px) * (v2 - py) - (v1 - py) * (u2 - px)
  e1 = (u2 - px) * (v0 - py) - (v2 - py) * (u0 - px)
  e2 = (u0 - px) * (v1 - py) - (v0 - py) * (u1 - px)
  area = e0 + e1 + e2
  inv = 1.0 / jnp.where(jnp.abs(area) > _MIN_AREA, area, 1.0)
  w0, w1, w2 = e0 * inv, e1 * inv, e2 * inv
  z = 1.0 / (w0 / z0 + w1 / z1 + w2 / z2)
  return (w0, w1, w2), z


def _inside(w):
  return jnp.minimum(jnp.minimum(w[0], w[1]), w[2]) >= -INSIDE_TOL


def grid_triangles(grid_CxHxW):
  """Per-face vertex attributes of the grid mesh as 3 x C x F, in the order of
  `grid_faces` (slicing, not a gather: gathers are slow on XLA:CPU)."""
  c = grid_CxHxW.shape[0]
  tl, tr = grid_CxHxW[:, :-1, :-1], grid_CxHxW[:, :-1, 1:]
  bl, br = grid_CxHxW[:, 1:, :-1], grid_CxHxW[:, 1:, 1:]
  cat = lambda a, b: jnp.concatenate([a.reshape(c, -1), b.reshape(c, -1)], axis=1)
  return jnp.stack([cat(tl, tr), cat(bl, bl), cat(tr, br)])


def mesh_triangles(verts_Nx3, faces_Fx3):
  """Face vertices [vertex, coord, face] of an arbitrary mesh (a gather)."""
  return jnp.transpose(verts_Nx3[jnp.asarray(faces_Fx3)], (1, 2, 0))


def _face_data(tri, height, width, face_valid_F):
  """Validity and integer pixel-centre bounding box (x0, x1, y0, y1) per face."""
  u, v, z = tri[:, 0], tri[:, 1], tri[:, 2]  # 3 x F each
  area = (u[1] - u[0]) * (v[2] - v[0]) - (v[1] - v[0]) * (u[2] - u[0])
  ok = (jnp.abs(area) > _MIN_AREA) & jnp.all(z > _NEAR, axis=0)
  ok &= jnp.all(jnp.isfinite(tri), axis=(0, 1))
  # Huge coordinates (vertex near the camera plane) must not overflow int32.
  ok &= (jnp.max(jnp.abs(u), 0) < 1e6) & (jnp.max(jnp.abs(v), 0) < 1e6)
  if face_valid_F is not None:
    ok &= face_valid_F
  pad = 1e-3  # covers the inside tolerance for faces of a few pixels
  x0 = jnp.ceil(jnp.min(u, 0) - pad)
  x1 = jnp.floor(jnp.max(u, 0) + pad)
  y0 = jnp.ceil(jnp.min(v, 0) - pad)
  y1 = jnp.floor(jnp.max(v, 0) + pad)
  ok &= (x0 <= width - 1) & (x1 >= 0) & (y0 <= height - 1) & (y1 >= 0)
  ok &= (x0 <= x1) & (y0 <= y1)
  box = [jnp.clip(x0, 0, width - 1), jnp.clip(x1, 0, width - 1),
         jnp.clip(y0, 0, height - 1), jnp.clip(y1, 0, height - 1)]
  return ok, [b.astype(jnp.int32) for b in box]


def _window_pass(tri, sel_ids, sel_valid, x0, y0, x1, y1, window, height, width):
  """Z-buffer of the faces `sel_ids` (those with sel_valid) against their
  window x window pixel centres from (x0, y0). Every face given must fit its
  window. Returns (z_HW, id_HW) with inf / -1 where nothing landed."""
  hw = height * width
  if sel_ids is not None:  # gathers are slow on XLA:CPU: skip them for "all"
    tri, x0, y0, x1, y1 = (a[..., sel_ids] for a in (tri, x0, y0, x1, y1))
  else:
    sel_ids = jnp.arange(tri.shape[-1], dtype=jnp.int32)
  oy, ox = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  px = x0[None] + jnp.asarray(ox.reshape(-1, 1))  # w^2 x S
  py = y0[None] + jnp.asarray(oy.reshape(-1, 1))
  w, zc = barycentric(tri[:, :, None], px.astype(tri.dtype), py.astype(tri.dtype))
  cand = sel_valid & (px <= x1) & (py <= y1) & _inside(w)
  zc = jnp.where(cand, zc, jnp.inf)
  pix = jnp.where(cand, py * width + px, hw)
  zbuf = jnp.full((hw + 1,), jnp.inf, tri.dtype).at[pix].min(zc)
  # Second scatter resolves the winner's id (ties: the larger id, any is exact).
  ids = jnp.where(cand & (zc == zbuf[pix]), sel_ids.astype(jnp.int32), -1)
  idbuf = jnp.full((hw + 1,), -1, jnp.int32).at[pix].max(ids)
  return zbuf[:hw], idbuf[:hw]


def _dense_pass(tri, sel_ids, sel_valid, height, width):
  """Z-buffer of the faces `sel_ids` against every pixel centre (no scatter)."""
  gx, gy = (g.astype(tri.dtype).ravel() for g in pixel_grid(Camera(height, width)))
  w, z = barycentric(tri[:, :, sel_ids, None], gx, gy)  # S x HW
  z = jnp.where(sel_valid[:, None] & _inside(w), z, jnp.inf)
  return jnp.min(z, axis=0), sel_ids[jnp.argmin(z, axis=0)].astype(jnp.int32)


def _merge(zb, ib, z, i):
  better = z < zb
  return jnp.where(better, z, zb), jnp.where(better, i, ib)


def rasterize(tri_3x3xF, height: int, width: int, face_valid_F=None,
              windows=(2, 6), chunks=(256, 32)):
  """Exact hard z-buffer: id of the nearest face at every pixel centre.

  tri_3x3xF: projected face vertices [vertex, (u, v, z), face], u, v in pixels,
  e.g. from `grid_triangles` or `mesh_triangles`.

  Faces are tiered by the size of their pixel-centre bounding box: all faces
  that fit windows[0] in one scatter pass; the rest, in chunks inside
  `lax.while_loop`s (so the trip count follows the data and nothing is
  dropped): those fitting windows[1] windowed (chunks[0] faces a trip), the
  remainder densely against all pixels (chunks[1] faces a trip).

  Returns (face_id_HxW int32, -1 where uncovered; num_dense int32 = faces
  that took the dense path). Carries no gradient.
  """
  tri = jax.lax.stop_gradient(tri_3x3xF)
  num_faces = tri.shape[-1]
  ok, (x0, x1, y0, y1) = _face_data(tri, height, width, face_valid_F)
  span = jnp.maximum(x1 - x0, y1 - y0) + 1  # pixel centres along the longer side
  w0, w1 = windows
  zbuf, idbuf = _window_pass(tri, None, ok & (span <= w0), x0, y0, x1, y1, w0,
                             height, width)

  def chunked(mask, size, pass_fn, zb, ib):
    count = jnp.sum(mask).astype(jnp.int32)
    (ids,) = jnp.nonzero(mask, size=-(-num_faces // size) * size, fill_value=0)
    ids = ids.astype(jnp.int32)

    def body(carry):
      i, zb, ib = carry
      sel = jax.lax.dynamic_slice(ids, (i * size,), (size,))
      valid = (i * size + jnp.arange(size)) < count
      return (i + 1,) + _merge(zb, ib, *pass_fn(sel, valid))

    _, zb, ib = jax.lax.while_loop(lambda c: c[0] * size < count, body,
                                   (jnp.int32(0), zb, ib))
    return zb, ib, count

  mid = ok & (span > w0) & (span <= w1)
  zbuf, idbuf, _ = chunked(
      mid, chunks[0],
      lambda s, v: _window_pass(tri, s, v, x0, y0, x1, y1, w1, height, width),
      zbuf, idbuf)
  zbuf, idbuf, num_dense = chunked(
      ok & (span > w1), chunks[1],
      lambda s, v: _dense_pass(tri, s, v, height, width), zbuf, idbuf)
  return idbuf.reshape(height, width), num_dense


def interpolate_depth(verts_uvz_Nx3, faces, face_id_HxW, cam: Camera):
  """Differentiable depth of the winning face at each pixel centre.

  Gradients flow to the vertices of the visible face (visibility is fixed).
  Uncovered pixels read `cam.far`; everything is clamped to [near, far].
  """
  covered = face_id_HxW >= 0
  fid = jnp.where(covered, face_id_HxW, 0)
  tri = mesh_triangles(verts_uvz_Nx3, jnp.asarray(faces)[fid.ravel()])
  x, y = pixel_grid(cam)
  _, z = barycentric(tri, x.ravel(), y.ravel())
  z = jnp.where(covered, z.reshape(cam.height, cam.width), cam.far)
  return jnp.clip(z, cam.near, cam.far)


def warp_depth(canon_depth_HxW, view_6, cam: Camera, face_valid_F=None):
  """Renders the canonical depth map's mesh seen from `view_6`.

  Returns (depth_HxW in the view, covered_HxW bool). Uncovered pixels = cam.far.
  """
  pts = depth_to_points(canon_depth_HxW, cam).reshape(-1, 3)
  uvz = project(transform_points(pts, view_6, cam), cam)
  tri = grid_triangles(uvz.T.reshape(3, cam.height, cam.width))
  fid, _ = rasterize(tri, cam.height, cam.width, face_valid_F)
  faces = grid_faces(cam.height, cam.width)
  return interpolate_depth(uvz, faces, fid, cam), fid >= 0


def inverse_warp_grid(depth_HxW, view_6, cam: Camera):
  """For each view pixel, the canonical-image pixel coordinates it comes from.

  Returns HxWx2 (x, y) in pixels of the canonical image.
  """
  pts = depth_to_points(depth_HxW, cam).reshape(-1, 3)
  uvz = project(inverse_transform_points(pts, view_6, cam), cam)
  return uvz[:, :2].reshape(cam.height, cam.width, 2)


def grid_sample(img_HxWxC, grid_HxWx2):
  """Bilinear sampling at pixel coordinates (x, y), zero outside the image.

  Equivalent to torch grid_sample(align_corners=True, padding_mode='zeros')
  with the grid given in pixels instead of [-1, 1].
  """
  h, w = img_HxWxC.shape[:2]
  x, y = grid_HxWx2[..., 0], grid_HxWx2[..., 1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0i + dx, y0i + dy
      inb = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      val = img_HxWxC[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
      out = out + jnp.where(inb, wx * wy, 0.0)[..., None] * val
  return out


# ----------------------------------------------------------------------------
# Shading
# ----------------------------------------------------------------------------

def depth_to_normals(depth_HxW, cam: Camera):
  """Unit normals by central differences of back-projected points (HxWx3).

  n = normalize(tu x tv), tu = P[y, x+1] - P[y, x-1], tv = P[y+1, x] - P[y-1, x];
  the 1-pixel border gets (0, 0, 1) as in Unsup3D.
  """
  p = depth_to_points(depth_HxW, cam)
  tu = p[1:-1, 2:] - p[1:-1, :-2]
  tv = p[2:, 1:-1] - p[:-2, 1:-1]
  n = jnp.cross(tu, tv)
  n = n / jnp.sqrt(jnp.sum(n * n, axis=-1, keepdims=True) + 1e-20)
  border = jnp.zeros(depth_HxW.shape + (3,), n.dtype).at[..., 2].set(1.0)
  return border.at[1:-1, 1:-1].set(n)


def light_direction(dxy_2):
  """Unit light direction normalize([dx, dy, 1])."""
  d = jnp.concatenate([dxy_2, jnp.ones_like(dxy_2[..., :1])], axis=-1)
  return d / jnp.linalg.norm(d, axis=-1, keepdims=True)


def shade(normal_HxWx3, ambient, diffuse, light_dxy_2):
  """Lambertian shading ambient + diffuse * max(0, n . d). Returns HxW."""
  d = light_direction(light_dxy_2)
  return ambient + diffuse * jnp.maximum(0.0, normal_HxWx3 @ d)


def sample_canonical(canon_image_BxHxWxC, depth_BxHxW, view_Bx6, cam: Camera):
  """The second half of rendering: every view pixel samples the canonical image
  where its surface point (view depth `depth_BxHxW`) comes from
  (`inverse_warp_grid`, bilinear `grid_sample`). Returns image_BxHxWxC."""
  grid = jax.vmap(functools.partial(inverse_warp_grid, cam=cam))(depth_BxHxW, view_Bx6)
  return jax.vmap(grid_sample)(canon_image_BxHxWxC, grid)


def render_views(canon_depth_BxHxW, canon_image_BxHxWxC, view_Bx6, cam: Camera,
                 face_valid_BxF=None):
  """Renders canonical (depth, image) pairs into their views: the rendering
  composition of the model's reconstruction (and, one image at a time, of
  `render_view`): the mesh of each depth map is rasterized in the view
  (`warp_depth_batch`), then `sample_canonical`.

  Returns (depth_BxHxW in the view, far where uncovered; image_BxHxWxC, not
  masked: uncovered pixels hold whatever the grid samples, so callers decide;
  covered_BxHxW bool).
  """
  depth, covered = warp_depth_batch(canon_depth_BxHxW, view_Bx6, cam, face_valid_BxF)
  return depth, sample_canonical(canon_image_BxHxWxC, depth, view_Bx6, cam), covered


def render_view(canon_depth_HxW, canon_image_HxWxC, view_6, cam: Camera,
                face_valid_F=None):
  """Renders one canonical (depth, image) pair into view_6 (`render_views` on a
  batch of one) for pictures and data: uncovered pixels are 0. Jitted, one
  program per shape: it is called in Python loops (turn-tables, the generator),
  where eager ops made a fresh executable per call.

  Returns dict: depth_HxW (view depth, far where uncovered), image_HxWxC
  (inverse-warped canonical image, 0 where uncovered), mask_HxW (float, 1 where
  the surface covers the pixel).
  """
  one = lambda a: None if a is None else jnp.asarray(a)[None]
  return _render_one(one(canon_depth_HxW), one(canon_image_HxWxC), one(view_6), cam,
                     one(face_valid_F))


@functools.partial(jax.jit, static_argnames=("cam",))
def _render_one(depth_1xHxW, image_1xHxWxC, view_1x6, cam, face_valid_1xF):
  depth, image, covered = render_views(depth_1xHxW, image_1xHxWxC, view_1x6, cam, face_valid_1xF)
  mask = covered[0].astype(image.dtype)
  return dict(depth=depth[0], image=image[0] * mask[..., None], mask=mask)


def warp_depth_batch(depth_BxHxW, view_Bx6, cam: Camera, face_valid_BxF=None):
  """Batched `warp_depth`. Visibility runs under `lax.map`, not `vmap`: the
  rasterizer's while-loops would otherwise run, for every image, as many trips
  as the worst image needs (2.5x slower at 64x64, batch 64). It carries no
  gradient, so nothing is lost; interpolation is vmapped."""
  def project_one(d, v):
    pts = depth_to_points(d, cam).reshape(-1, 3)
    return project(transform_points(pts, v, cam), cam)

  uvz = jax.vmap(project_one)(depth_BxHxW, view_Bx6)  # B x HW x 3

  def visible(args):
    uvz_i, valid_i = args
    tri = grid_triangles(uvz_i.T.reshape(3, cam.height, cam.width))
    return rasterize(tri, cam.height, cam.width, valid_i)[0]

  valid = face_valid_BxF
  if valid is None:
    fid = jax.lax.map(lambda u: visible((u, None)), jax.lax.stop_gradient(uvz))
  else:
    fid = jax.lax.map(visible, (jax.lax.stop_gradient(uvz), valid))
  faces = grid_faces(cam.height, cam.width)
  depth = jax.vmap(lambda u, f: interpolate_depth(u, faces, f, cam))(uvz, fid)
  return depth, fid >= 0
