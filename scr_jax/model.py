"""The SCR forward pass: image -> embeddings -> (structure) -> factors -> render.

`forward(nets, params, img_BxSxSx3, structure, cfg)` is a pure function; the
causal structure is an argument (a single `structure.Structure`: M 4x4, or the
dense mask of dynamic SCR with q, whose `adjacency(u)` gives M per image), so
any structure — and a vmap over a stack of them — uses this one path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import render, structure as structure_lib


def camera(cfg) -> render.Camera:
  return render.Camera(cfg.image_size, cfg.image_size, cfg.fov, cfg.min_depth,
                       cfg.max_depth, cfg.rot_center_depth)


def convex_prior(size: int) -> np.ndarray:
  """An ellipsoidal bump, -1 at the centre, 0 outside radius 0.9 (SxS)."""
  t = np.linspace(-1, 1, size)
  y, x = np.meshgrid(t, t, indexing="ij")
  r2 = (x / 0.8) ** 2 + (y / 0.9) ** 2
  return -np.sqrt(np.clip(1 - r2, 0, 1)).astype(np.float32)


def depth_from_raw(raw_BxSxS, cam: render.Camera, prior: float = 0.0, scale=None):
  """Unsup3D's depth head: remove the per-image mean, tanh, map to
  [min, max]; the 2 leftmost / rightmost columns get the border depth.
  `prior` scales a fixed convex offset (see Config.depth_prior); `scale`
  (None or a scalar in [0, 1]) scales the network's part (depth warm-up)."""
  if scale is not None:
    raw_BxSxS = raw_BxSxS * scale
  if prior:
    raw_BxSxS = raw_BxSxS + prior * convex_prior(raw_BxSxS.shape[-1])
  d = raw_BxSxS - jnp.mean(raw_BxSxS, axis=(1, 2), keepdims=True)
  d = jnp.tanh(d)
  d = (1 + d) / 2 * cam.max_depth + (1 - d) / 2 * cam.min_depth
  border = np.zeros(raw_BxSxS.shape[1:], np.float32)
  border[:, :2], border[:, -2:] = 1.0, 1.0
  return d * (1 - border) + border * cam.border_depth


def view_from_raw(raw_Bx6, cfg, trans=None, tilt=None):
  """tanh outputs -> (rx, ry, rz in radians, tx, ty, tz).

  trans: None, or a scalar in [0, 1] scaling the translation ranges
    (`Config.trans_warmup_steps`).
  tilt: None, or a scalar in [0, 1] scaling pitch rx and roll rz
    (`Config.tilt_warmup_steps`).
  """
  rot = raw_Bx6[:, :3] * np.deg2rad(cfg.xyz_rotation_range)
  if tilt is not None:
    rot = rot * jnp.stack([tilt, jnp.ones_like(tilt), tilt])
  txy = raw_Bx6[:, 3:5] * cfg.xy_translation_range
  tz = raw_Bx6[:, 5:6] * cfg.z_translation_range
  t = jnp.concatenate([txy, tz], axis=1)
  return jnp.concatenate([rot, t if trans is None else trans * t], axis=1)


def light_from_raw(raw_Bx4):
  """tanh outputs -> ambient, diffuse in [0, 1], direction (dx, dy)."""
  return (raw_Bx4[:, 0] + 1) / 2, (raw_Bx4[:, 1] + 1) / 2, raw_Bx4[:, 2:4]


def symmetrize(x_BxSxS_, weight):
  """Blends a canonical map (depth BxSxS or albedo BxSxSx3) towards its
  left-right symmetric part: (1 - w) x + w (x + flip(x)) / 2, w in [0, 1]."""
  return x_BxSxS_ + weight * 0.5 * (x_BxSxS_[:, :, ::-1] - x_BxSxS_)


def factors(nets, params, img_BxSxSx3, structure, cfg, sym=None, trans=None, tilt=None,
            dscale=None):
  """Image in [0, 1] -> dict of factors (canonical depth, albedo, light, view),
  embeddings u_Bx4xd and the adjacency actually used (4x4 or Bx4x4).

  structure: a single `structure.Structure` (m 4x4; vmap over a stack).

  sym: None, or a scalar weight in [0, 1] that makes the canonical depth and
    albedo (partly) left-right symmetric (`Config.sym_warmup_steps`).
  trans, tilt: None, or scalars in [0, 1] scaling the view's translation and
    its pitch / roll (`Config.trans_warmup_steps`, `Config.tilt_warmup_steps`).
  dscale: None, or a scalar in [0, 1] scaling the depth net's output
    (`Config.depth_warmup_steps`).
  """
  x = img_BxSxSx3 * 2 - 1
  u = nets.apply(params, x, method=nets.encode)
  adj = structure.adjacency(u)
  raw = nets.apply(params, structure_lib.mix(u, adj), method=nets.decode)
  cam = camera(cfg)
  ambient, diffuse, light_dxy = light_from_raw(raw["L"])
  depth = depth_from_raw(raw["D"][..., 0], cam, cfg.depth_prior, dscale)
  albedo = raw["A"]  # [-1, 1]
  if sym is not None:
    depth, albedo = symmetrize(depth, sym), symmetrize(albedo, sym)
  return dict(
      depth=depth, albedo=albedo,
      ambient=ambient, diffuse=diffuse, light_dxy=light_dxy,
      view=view_from_raw(raw["V"], cfg, trans, tilt),
      u=u, m=adj)


def shade_canonical(depth_BxSxS, albedo_BxSxSx3, ambient, diffuse, light_dxy, cam):
  """Canonical image in [-1, 1] and its normals / shading."""
  normal = jax.vmap(functools.partial(render.depth_to_normals, cam=cam))(depth_BxSxS)
  shading = jax.vmap(render.shade)(normal, ambient, diffuse, light_dxy)
  image = (albedo_BxSxSx3 / 2 + 0.5) * shading[..., None] * 2 - 1
  return image, normal, shading


def render_factors(f, cam: render.Camera):
  """Renders the original and the flipped twin (canonical depth and albedo
  flipped horizontally; view and light shared). Leading axis 2B: [orig; flip]."""
  depth = jnp.concatenate([f["depth"], f["depth"][:, :, ::-1]], 0)
  albedo = jnp.concatenate([f["albedo"], f["albedo"][:, :, ::-1]], 0)
  dup = lambda a: jnp.concatenate([a, a], 0)
  canon_im, normal, shading = shade_canonical(
      depth, albedo, dup(f["ambient"]), dup(f["diffuse"]), dup(f["light_dxy"]), cam)
  view = dup(f["view"])
  recon_depth, covered = render.warp_depth_batch(depth, view, cam)
  grid = jax.vmap(functools.partial(render.inverse_warp_grid, cam=cam))(recon_depth, view)
  recon_im = jax.vmap(render.grid_sample)(canon_im, grid)
  return dict(canon_depth=depth, canon_im=canon_im, canon_normal=normal,
              canon_shading=shading, recon_depth=recon_depth,
              recon_mask=covered.astype(jnp.float32), recon_im=recon_im)


def forward(nets, params, img_BxSxSx3, structure, cfg, sym=None, trans=None, tilt=None,
            dscale=None):
  f = factors(nets, params, img_BxSxSx3, structure, cfg, sym, trans, tilt, dscale)
  out = render_factors(f, camera(cfg))
  out.update(f)
  out["sigma_l1"], out["sigma_perc"] = nets.apply(params, img_BxSxSx3 * 2 - 1,
                                                  method=nets.confidence)
  return out
