"""The SCR forward pass: image -> embeddings -> (structure) -> factors -> render.

`forward(nets, params, img_BxSxSx3, structure, cfg, warmups)` is a pure
function (warmups: `warmup.Warmups`, the training warm-ups' scales; by default
none, the free model); the
causal structure is an argument (a single `structure.Structure`: M 4x4, or the
dense mask of dynamic SCR with q, whose `adjacency(u)` gives M per image), so
any structure — and a vmap over a stack of them — uses this one path.
"""
from __future__ import annotations

import functools

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from scr_jax import config as config_lib, render, structure as structure_lib
from scr_jax.warmup import Warmups


def camera(cfg) -> render.Camera:
  return render.Camera(cfg.image_size, cfg.image_size, cfg.fov, cfg.min_depth,
                       cfg.max_depth, cfg.rot_center_depth)


def convex_prior(size: int, ellipse=config_lib.DEFAULT_PRIOR_ELLIPSE) -> np.ndarray:
  """An ellipsoidal bump (SxS): -sqrt(1 - r^2), r^2 = ((u - cx) / a)^2 +
  ((v - cy) / b)^2, so -1 at the centre and 0 outside the ellipse;
  ellipse = (a, b, cx, cy) in normalised image units (u right, v down, in
  [-1, 1])."""
  a, b, cx, cy = ellipse
  t = np.linspace(-1, 1, size)
  y, x = np.meshgrid(t, t, indexing="ij")
  r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
  return -np.sqrt(np.clip(1 - r2, 0, 1)).astype(np.float32)


def object_masks(img_NxSxSx3, threshold: float = 0.08) -> np.ndarray:
  """Per image, the pixels that differ from its background colour (the
  median of its 1-pixel frame border) by more than `threshold` in any
  channel: a bool NxSxS object mask. Images in [0, 1] floats or uint8
  (values above 1.5 are read as 0-255). A heuristic for plain backgrounds;
  a textured one gives a mask covering most of the frame."""
  x = np.asarray(img_NxSxSx3, np.float32)
  if x.max() > 1.5:
    x = x / 255.0
  border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
  bg = np.median(border, axis=1)  # Nx3
  return np.abs(x - bg[:, None, None]).max(axis=-1) > threshold


def fit_prior_ellipse(img_NxSxSx3, threshold: float = 0.08) -> tuple:
  """The ellipse (a, b, cx, cy) of the training images' mean object
  silhouette, for `convex_prior` (Config.depth_prior_ellipse="fit").

  A pixel is object where it differs from its image's background colour
  (the median of the 1-pixel frame border) by more than `threshold` in any
  channel (images in [0, 1], or uint8); the mean of these masks over the
  images is treated as a density whose first and second moments give the
  centre and the half-axes (a uniform ellipse of half-axis a has variance
  a^2 / 4, so a = 2 sigma), symmetric in u (the canonical frame is left-right
  symmetric: cx = 0). Photos whose background is not uniform give a mask
  covering most of the frame and so a wide ellipse; half-axes are clipped
  to [0.3, 0.95], the centre to |cy| <= 0.3. Returns floats rounded to 3
  decimals (they are saved in the config)."""
  fg = object_masks(img_NxSxSx3, threshold).mean(axis=0)
  fg = 0.5 * (fg + fg[:, ::-1])
  size = fg.shape[-1]
  t = np.linspace(-1, 1, size)
  w = fg / max(fg.sum(), 1e-9)
  cy = float((w.sum(axis=1) * t).sum())
  var_u = float((w.sum(axis=0) * t ** 2).sum())
  var_v = float((w.sum(axis=1) * (t - cy) ** 2).sum())
  a = float(np.clip(2 * np.sqrt(var_u), 0.3, 0.95))
  b = float(np.clip(2 * np.sqrt(var_v), 0.3, 0.95))
  return (round(a, 3), round(b, 3), 0.0, round(float(np.clip(cy, -0.3, 0.3)), 3))


def depth_from_raw(raw_BxSxS, cam: render.Camera, prior: float = 0.0, scale=None,
                   ellipse=config_lib.DEFAULT_PRIOR_ELLIPSE):
  """Unsup3D's depth head: remove the per-image mean, tanh, map to
  [min, max]; the 2 leftmost / rightmost columns get the border depth.
  `prior` scales a fixed convex offset (see Config.depth_prior) of shape
  `convex_prior(S, ellipse)`; `scale` (None or a scalar in [0, 1]) scales
  the network's part (depth warm-up)."""
  if scale is not None:
    raw_BxSxS = raw_BxSxS * scale
  if not isinstance(prior, (int, float)) or prior:  # a traced amplitude (prior warm-up) too
    raw_BxSxS = raw_BxSxS + prior * convex_prior(raw_BxSxS.shape[-1], ellipse)
  d = raw_BxSxS - jnp.mean(raw_BxSxS, axis=(1, 2), keepdims=True)
  d = jnp.tanh(d)
  d = (1 + d) / 2 * cam.max_depth + (1 - d) / 2 * cam.min_depth
  border = np.zeros(raw_BxSxS.shape[1:], np.float32)
  border[:, :2], border[:, -2:] = 1.0, 1.0
  return d * (1 - border) + border * cam.border_depth


def prior_amplitude(cfg, warmups: Warmups = Warmups()):
  """The convex prior's amplitude in `depth_from_raw`: `cfg.depth_prior`,
  scaled by the prior warm-up during training (`warmups.prior`); the free
  model of a config with a prior warm-up (`cfg.warmup.prior_steps` > 0) has
  no prior (the warm-up faded it to 0), any other has `cfg.depth_prior`.
  A float, or a traced scalar during training."""
  if warmups.prior is not None:
    return cfg.depth_prior * warmups.prior
  return 0.0 if cfg.warmup.prior_steps > 0 else cfg.depth_prior


def view_from_raw(raw_Bx6, cfg, trans=None, tilt=None):
  """tanh outputs -> (rx, ry, rz in radians, tx, ty, tz).

  trans: None, or a scalar in [0, 1] scaling the translation ranges
    (`Warmups.trans`).
  tilt: None, or a scalar in [0, 1] scaling pitch rx and roll rz
    (`Warmups.tilt`).
  """
  rot = raw_Bx6[:, :3] * np.deg2rad(cfg.xyz_rotation_range)
  if tilt is not None:
    rot = rot * jnp.stack([tilt, jnp.ones_like(tilt), tilt])
  txy = raw_Bx6[:, 3:5] * cfg.xy_translation_range
  tz = raw_Bx6[:, 5:6] * cfg.z_translation_range
  t = jnp.concatenate([txy, tz], axis=1)
  return jnp.concatenate([rot, t if trans is None else trans * t], axis=1)


def light_from_raw(raw_Bx4, intensity=None):
  """tanh outputs -> ambient, diffuse in [0, 1], direction (dx, dy).

  intensity: None, or a scalar in [0, 1] scaling the intensities' raw
    outputs (`Warmups.light`: 0 holds ambient and diffuse at 0.5)."""
  amb_dif = raw_Bx4[:, :2] if intensity is None else raw_Bx4[:, :2] * intensity
  return (amb_dif[:, 0] + 1) / 2, (amb_dif[:, 1] + 1) / 2, raw_Bx4[:, 2:4]


def symmetrize(x_BxSxS_, weight):
  """Blends a canonical map (depth BxSxS or albedo BxSxSx3) towards its
  left-right symmetric part: (1 - w) x + w (x + flip(x)) / 2, w in [0, 1]."""
  return x_BxSxS_ + weight * 0.5 * (x_BxSxS_[:, :, ::-1] - x_BxSxS_)


def to_model_range(img_BxSxSx3):
  """Images in [0, 1] (every public boundary) -> [-1, 1] (inside the model,
  as Unsup3D): the one place the input is converted."""
  return img_BxSxSx3 * 2 - 1


def to_unit_range(x_BxSxSx3):
  """The model's [-1, 1] images (canonical / reconstructed images, albedo) ->
  [0, 1], for everything outside the model."""
  return x_BxSxSx3 / 2 + 0.5


@struct.dataclass
class Factors:
  """What the decoders predict for a batch of B images (before rendering).

  depth_BxSxS: canonical depth (metric z, border columns at the border depth).
  albedo_BxSxSx3: canonical albedo in [-1, 1] (`to_unit_range` for [0, 1]).
  ambient_B, diffuse_B: light intensities in [0, 1].
  light_dxy_Bx2: light direction, normalize([dx, dy, 1]).
  view_Bx6: (rx, ry, rz in radians, tx, ty, tz).
  u_Bx4xd: the factors' embeddings (V, D, L, A); None for factors that do
    not come from the networks (e.g. ground truth fed to `render_factors`).
  adjacency: the M applied (4x4, or Bx4x4 per image for dynamic SCR); None
    as u.
  """
  depth_BxSxS: jax.Array
  albedo_BxSxSx3: jax.Array
  ambient_B: jax.Array
  diffuse_B: jax.Array
  light_dxy_Bx2: jax.Array
  view_Bx6: jax.Array
  u_Bx4xd: jax.Array | None = None
  adjacency: jax.Array | None = None


@struct.dataclass
class Rendering:
  """One rendering of a batch of factors: the original, or its flipped twin
  (canonical depth and albedo mirrored left-right, view and light shared).

  canon_depth_BxSxS: the canonical depth rendered (mirrored for the twin).
  canon_im_BxSxSx3: shaded canonical image in [-1, 1] (`canon_image()`: [0, 1]).
  canon_normal_BxSxSx3: unit normals (camera frame).
  canon_shading_BxSxS: ambient + diffuse * max(0, n.l).
  recon_depth_BxSxS: depth of the canonical mesh seen in the predicted view.
  recon_mask_BxSxS: 1 where that mesh covers the pixel, else 0.
  recon_im_BxSxSx3: the reconstructed input in [-1, 1] (`recon_image()`: [0, 1]).
  """
  canon_depth_BxSxS: jax.Array
  canon_im_BxSxSx3: jax.Array
  canon_normal_BxSxSx3: jax.Array
  canon_shading_BxSxS: jax.Array
  recon_depth_BxSxS: jax.Array
  recon_mask_BxSxS: jax.Array
  recon_im_BxSxSx3: jax.Array

  def canon_image(self):
    """The shaded canonical image in [0, 1] (not clipped)."""
    return to_unit_range(self.canon_im_BxSxSx3)

  def recon_image(self):
    """The reconstructed input in [0, 1] (not clipped)."""
    return to_unit_range(self.recon_im_BxSxSx3)


@struct.dataclass
class ForwardOutput:
  """`forward`'s result for a batch of B images.

  factors: the predicted `Factors`.
  orig, flip: the `Rendering` of the factors and of their flipped twin.
  sigma_l1_BxSxSx2: confidence of the photometric loss (channel 0: orig,
    1: flip), softplus, before Config.min_sigma is added.
  sigma_perc_BxTxTx2: the same for the perceptual loss (T = S / 4).
  input_BxSxSx3: the input image in the model's range [-1, 1]: what the
    reconstructions are compared with (`to_model_range`, done once).
  """
  factors: Factors
  orig: Rendering
  flip: Rendering
  sigma_l1_BxSxSx2: jax.Array
  sigma_perc_BxTxTx2: jax.Array
  input_BxSxSx3: jax.Array


def factors(nets, params, img_BxSxSx3, structure, cfg,
            warmups: Warmups = Warmups()) -> Factors:
  """Image in [0, 1] -> `Factors` (canonical depth, albedo, light, view,
  embeddings u_Bx4xd and the adjacency actually used, 4x4 or Bx4x4).

  structure: a single `structure.Structure` (m 4x4; vmap over a stack).
  warmups: the training warm-ups' scales (`warmup.warmups(cfg, step)`);
    the default, `Warmups.none()`, is the free model. This is the one place
    they are applied to the factors: `sym` blends the canonical depth and / or
    albedo (`Config.warmup.sym_maps`) towards their mirror image, `trans` and
    `tilt` scale the view's translation and its pitch / roll, `depth` scales
    the depth net's output, `prior` the convex prior, `light` the light's
    intensities. With `cfg.light_fit` > 0 the light is the fitted one
    (`fit_light`, at full weight: the free model's), as in `forward`.
  """
  x = to_model_range(img_BxSxSx3)
  f = _factors(nets, params, x, structure, cfg, warmups)
  return fit_light(f, x, camera(cfg), cfg.light_fit) if cfg.light_fit > 0 else f


def _factors(nets, params, x_BxSxSx3, structure, cfg, warmups: Warmups) -> Factors:
  """`factors` of an input already in [-1, 1]."""
  u = nets.apply(params, x_BxSxSx3, method=nets.encode)
  adj = structure.adjacency(u)
  raw = nets.apply(params, structure_lib.mix(u, adj, cfg.mix_scale, cfg.mix_parent_grad),
                  method=nets.decode)
  cam = camera(cfg)
  ambient, diffuse, light_dxy = light_from_raw(raw["L"], warmups.light)
  depth = depth_from_raw(raw["D"][..., 0], cam, prior_amplitude(cfg, warmups), warmups.depth,
                         config_lib.prior_ellipse(cfg) if cfg.depth_prior else None)
  albedo = raw["A"]  # [-1, 1]
  if warmups.sym is not None:
    maps = cfg.warmup.sym_map_names()
    depth = symmetrize(depth, warmups.sym) if "depth" in maps else depth
    albedo = symmetrize(albedo, warmups.sym) if "albedo" in maps else albedo
  return Factors(depth_BxSxS=depth, albedo_BxSxSx3=albedo, ambient_B=ambient,
                 diffuse_B=diffuse, light_dxy_Bx2=light_dxy,
                 view_Bx6=view_from_raw(raw["V"], cfg, warmups.trans, warmups.tilt),
                 u_Bx4xd=u, adjacency=adj)


def _light_normal_equations(normal_NxHxWx3, albedo_NxHxWx3, target_NxHxWx3, weight_NxHxW):
  """Normal equations of target ~ albedo * (ambient + n . l) in theta =
  (ambient, l): per-pixel features f = [1, n], summed over the N canonical
  maps, pixels and colour channels and divided by the weight's sum.
  Returns (G 4x4, b 4)."""
  f = jnp.concatenate([jnp.ones_like(normal_NxHxWx3[..., :1]), normal_NxHxWx3], -1)
  f = f.reshape(-1, 4)
  a = albedo_NxHxWx3.reshape(-1, 3)
  w = weight_NxHxW.reshape(-1)
  t = target_NxHxWx3.reshape(-1, 3)
  wa2 = w * jnp.sum(a * a, -1)
  wat = w * jnp.sum(a * t, -1)
  norm = jnp.maximum(jnp.sum(w) * 3, 1.0)
  return (f * wa2[:, None]).T @ f / norm, f.T @ wat / norm


def fit_light(f: Factors, x_BxSxSx3, cam: render.Camera, ridge: float, warped=None,
              weight=None) -> Factors:
  """`f` with the Lambertian light that best explains each image given its
  canonical depth, albedo and view (Config.light_fit > 0).

  The canonical albedo a (in [0, 1]) and normals n of the original and of the
  flipped twin are rendered into the view (the reconstruction's own warp:
  `render.warp_depth_batch`, `render.sample_canonical`); theta = (ambient, l),
  l = diffuse x direction, solves the ridge least squares over the covered
  pixels p and colour channels c of both,
    sum (a_c(p) (ambient + n(p) . l) - I_c(p))^2 / count + ridge |theta - theta_0|^2
  (I: the image in [0, 1]; theta_0: f's light, the light network's
  prediction), twice: the second time with the pixels that the first light
  leaves unlit (n . l <= 0, no gradient) lit by the ambient only, as
  `render.shade`'s max(0, .). The gradient flows through the solves
  (variable projection). Exact up to bilinear resampling: an image rendered
  from known factors gives back its light (tests/test_learning.py).
  x_BxSxSx3: the image in [-1, 1]; warped: `_warp_both(f, cam)` if already
  computed; weight: None, or a scalar in [0, 1] blending theta_0 (0) into
  the fit (1) (`Warmups.fit`). The returned light_dxy = (l_x, l_y) / l_z
  keeps l_z >= 0.1 |l| (a light from the camera's side); ambient and
  diffuse are not clipped.
  """
  b = f.depth_BxSxS.shape[0]
  depth, albedo, view = _twins(f)
  recon_depth, covered = warped if warped is not None else _warp_both(f, cam)
  normal = jax.vmap(functools.partial(render.depth_to_normals, cam=cam))(depth)
  maps = render.sample_canonical(jnp.concatenate([to_unit_range(albedo), normal], -1),
                                 recon_depth, view, cam)
  covered = covered.astype(maps.dtype)
  pair = lambda a: jnp.stack([a[:b], a[b:]], 1)  # 2B x ... -> B x 2 x ...
  alb_Bx2xSxSx3, nrm_Bx2xSxSx3, w_Bx2xSxS = pair(maps[..., :3]), pair(maps[..., 3:]), pair(covered)
  img = to_unit_range(x_BxSxSx3)
  theta0_Bx4 = jnp.concatenate([f.ambient_B[:, None], f.diffuse_B[:, None]
                                * jax.vmap(render.light_direction)(f.light_dxy_Bx2)], -1)
  eye = ridge * jnp.eye(4, dtype=theta0_Bx4.dtype)

  def one(alb, nrm, w, im, theta0):
    target = jnp.stack([im, im])
    g, rhs = _light_normal_equations(nrm, alb, target, w)
    theta = jnp.linalg.solve(g + eye, rhs + ridge * theta0)
    lit = jax.lax.stop_gradient((nrm @ theta[1:] > 0).astype(nrm.dtype))
    g, rhs = _light_normal_equations(nrm * lit[..., None], alb, target, w)
    return jnp.linalg.solve(g + eye, rhs + ridge * theta0)

  theta_Bx4 = jax.vmap(one)(alb_Bx2xSxSx3, nrm_Bx2xSxSx3, w_Bx2xSxS, img, theta0_Bx4)
  if weight is not None:
    theta_Bx4 = theta0_Bx4 + weight * (theta_Bx4 - theta0_Bx4)
  lvec = theta_Bx4[:, 1:]
  diffuse = jnp.sqrt(jnp.sum(lvec * lvec, -1) + 1e-12)
  lz = jnp.maximum(lvec[:, 2], 0.1 * diffuse)
  return f.replace(ambient_B=theta_Bx4[:, 0], diffuse_B=diffuse,
                   light_dxy_Bx2=lvec[:, :2] / lz[:, None])


def shade_canonical(depth_BxSxS, albedo_BxSxSx3, ambient, diffuse, light_dxy, cam):
  """Canonical image in [-1, 1] (albedo in [-1, 1]) and its normals / shading."""
  normal = jax.vmap(functools.partial(render.depth_to_normals, cam=cam))(depth_BxSxS)
  shading = jax.vmap(render.shade)(normal, ambient, diffuse, light_dxy)
  image = to_model_range(to_unit_range(albedo_BxSxSx3) * shading[..., None])
  return image, normal, shading


def _twins(f: Factors):
  """(depth, albedo, view) of the original and its flipped twin as one batch
  of 2B: canonical depth and albedo mirrored left-right, the view shared."""
  dup = lambda a: jnp.concatenate([a, a], 0)
  return (jnp.concatenate([f.depth_BxSxS, f.depth_BxSxS[:, :, ::-1]], 0),
          jnp.concatenate([f.albedo_BxSxSx3, f.albedo_BxSxSx3[:, :, ::-1]], 0),
          dup(f.view_Bx6))


def _warp_both(f: Factors, cam: render.Camera):
  """The twins' meshes rasterized in the view: (depth 2BxSxS, covered 2BxSxS)."""
  depth, _, view = _twins(f)
  return render.warp_depth_batch(depth, view, cam)


def render_factors(f: Factors, cam: render.Camera, x_BxSxSx3=None, light_fit: float = 0.0,
                   fit_weight=None):
  """Renders the original and the flipped twin (canonical depth and albedo
  flipped horizontally; view and light shared). Returns (orig, flip); both are
  rendered as one batch of 2B.

  x_BxSxSx3 (the image in [-1, 1]) and light_fit > 0: the light is first
  fitted to the image (`fit_light`, ridge light_fit) and the fitted light is
  what shades; then the factors actually rendered are returned as a third
  element: (orig, flip, fitted factors); fit_weight as `fit_light`'s weight."""
  depth, albedo, view = _twins(f)
  recon_depth, covered = render.warp_depth_batch(depth, view, cam)
  fitted = light_fit > 0 and x_BxSxSx3 is not None
  if fitted:
    f = fit_light(f, x_BxSxSx3, cam, light_fit, (recon_depth, covered), fit_weight)
  dup = lambda a: jnp.concatenate([a, a], 0)
  canon_im, normal, shading = shade_canonical(
      depth, albedo, dup(f.ambient_B), dup(f.diffuse_B), dup(f.light_dxy_Bx2), cam)
  recon_im = render.sample_canonical(canon_im, recon_depth, view, cam)
  both = (depth, canon_im, normal, shading, recon_depth, covered.astype(jnp.float32), recon_im)
  b = f.depth_BxSxS.shape[0]
  orig, flip = Rendering(*(a[:b] for a in both)), Rendering(*(a[b:] for a in both))
  return (orig, flip, f) if fitted else (orig, flip)


def forward(nets, params, img_BxSxSx3, structure, cfg,
            warmups: Warmups = Warmups()) -> ForwardOutput:
  """Image in [0, 1] -> `ForwardOutput` (factors, the original and flipped
  renderings, confidence maps). Arguments as `factors`; the confidence
  warm-up (`warmups.conf_hold`) is the loss's (`losses.total_loss`)."""
  x = to_model_range(img_BxSxSx3)
  f = _factors(nets, params, x, structure, cfg, warmups)
  if cfg.light_fit > 0:
    orig, flip, f = render_factors(f, camera(cfg), x, cfg.light_fit, warmups.fit)
  else:
    orig, flip = render_factors(f, camera(cfg))
  sigma_l1, sigma_perc = nets.apply(params, x, method=nets.confidence)
  return ForwardOutput(factors=f, orig=orig, flip=flip, sigma_l1_BxSxSx2=sigma_l1,
                       sigma_perc_BxTxTx2=sigma_perc, input_BxSxSx3=x)
