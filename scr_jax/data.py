"""Data: a procedural symmetric-face generator, synface folders, image folders.

Three ways to get training data, all returning plain numpy:
  * `generate_split` / `generate_splits`: procedural, roughly symmetric
    face-like height fields with ground-truth depth, rendered with the
    project's renderer (`render.render_view`) from a random view and light;
  * `export_synface` / `load_synface`: Unsup3D's synface folder layout
    `DIR/{train,val,test}/{image,depth}/NNNNNN_{image,depth}.png`;
  * `load_image_folder`: image-only folders (CelebA crops, cat faces).
The TFDS builder lives in `tfds_synface.py`; it is imported lazily
(`load_tfds`, `build_tfds` below), so folders work without TFDS installed.

Depth PNG convention (Unsup3D's): a value v in [0, 1] means
z = 1.0 + 0.1 * ((1 - v) * 2 - 1), i.e. v = (1.1 - z) / 0.2: bright = near,
black = far = background.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from scr_jax import render
from scr_jax.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Unsup3D's depth PNG mapping (fixed, independent of the camera range).
_PNG_DEPTH_MID, _PNG_DEPTH_HALF = 1.0, 0.1


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """Generator parameters (everything but size, counts and seed).

  Angles in degrees; `max_shift` is the x/y translation range in metric units.
  `asymmetry` scales an antisymmetric perturbation: 0 gives canonical depth
  and albedo that equal their left-right flip exactly; at 1 the depth differs
  from its flip by up to 2 * 0.01 and the albedo by up to 2 * 0.15.
  `albedo` picks the albedo family: "skin" (skin tones, hair, brows) or
  "blotch" (any base colour with random symmetric colour blotches, no hair).
  The light direction is (dx, dy, 1) normalised with dx, dy uniform in
  +-max_light_dxy; the model's light head (tanh) reaches |dx|, |dy| <= 1.
  """
  max_yaw_deg: float = 40.0
  max_pitch_deg: float = 5.0
  max_roll_deg: float = 3.0
  max_shift: float = 0.0
  asymmetry: float = 0.0
  ambient_range: tuple = (0.4, 0.7)
  diffuse_range: tuple = (0.35, 0.65)
  max_light_dxy: float = 0.8
  fov_deg: float = 10.0
  min_depth: float = 0.9
  max_depth: float = 1.1
  albedo: str = "skin"  # skin | blotch
  chunk: int = 64  # samples rendered per jitted call (fixed: stable results)

  def camera(self, size: int) -> render.Camera:
    return render.Camera(size, size, fov_deg=self.fov_deg,
                         min_depth=self.min_depth, max_depth=self.max_depth)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "GenConfig":
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
         if k in {f.name for f in dataclasses.fields(cls)}}
    return cls(**d)

# Asymmetry amplitudes at asymmetry = 1 (see GenConfig).
_ASYM_DEPTH, _ASYM_ALBEDO = 0.01, 0.15
_ALBEDO_FAMILIES = ("skin", "blotch")


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named generator setting: the GenConfig and, optionally, the size the
  data is exported at (None: the training image size; a larger size means
  the loader downsamples, i.e. trained below the stored resolution)."""
  gen: GenConfig
  export_size: int | None = None
  doc: str = ""


# Named variants for `run.py data --variant NAME`, `--data builtin:NAME` and
# the robustness benchmark (experiments/bench_quality.py).
VARIANTS = {
    "default": Variant(GenConfig(), None, "the built-in data: yaw +-40, pitch +-5, roll +-3"),
    "wide_pose": Variant(GenConfig(max_pitch_deg=15.0, max_roll_deg=8.0, max_shift=0.02),
                         None, "pitch +-15, roll +-8, x/y shift +-0.02"),
    "harsh_light": Variant(GenConfig(ambient_range=(0.3, 0.6), diffuse_range=(0.4, 0.8),
                                     max_light_dxy=1.0),
                           None, "ambient 0.3-0.6, diffuse 0.4-0.8, light from any side "
                           "(|dx|, |dy| <= 1, up to 55 degrees off axis)"),
    "hires64": Variant(GenConfig(), 64, "default faces stored at 64 px (trained at the "
                       "config's size, e.g. 32: the loader downsamples)"),
    "albedo_alt": Variant(GenConfig(albedo="blotch"), None,
                          "any base colour with random colour blotches, no hair"),
}


def get_variant(name: str) -> Variant:
  """The named generator variant; unknown names are a UserError."""
  if name not in VARIANTS:
    raise UserError(f"unknown data variant {name!r}; choose one of: {', '.join(VARIANTS)}")
  return VARIANTS[name]


# ----------------------------------------------------------------------------
# Per-sample parameters
# ----------------------------------------------------------------------------

def _split_code(split: str) -> int:
  # Known splits get fixed small codes; any other name still gets its own stream.
  return _SPLIT_CODES.get(split, zlib.crc32(split.encode()) + 3)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The random stream of one sample: a function of (seed, split, index) only,
  so a split never depends on the sizes of the others (or of itself)."""
  if seed < 0 or index < 0:
    raise UserError(f"seed and sample index must be >= 0, got seed={seed}, index={index}")
  return np.random.default_rng([int(seed), _split_code(split), int(index)])


def sample_params(rng: np.random.Generator, cfg: GenConfig) -> dict:
  """Draws shape, albedo, view and light parameters of one sample.

  Lengths are in normalised image units (u, v in [-1, 1] across the frame,
  v down) unless named *_h (heights in metric depth units).
  """
  U = rng.uniform
  p = {}
  # Head: egg-shaped silhouette (narrower at the jaw), bump height, profile.
  p["a"], p["b"], p["cy"] = U(0.84, 0.96), U(0.94, 1.04), U(-0.03, 0.05)
  p["egg"] = U(0.08, 0.22)
  # Head bump h (1 - r^2q): flat front, sides sloping down to the outline; deep
  # enough that the nose stays (mostly) inside the outline at large yaw.
  p["head_h"], p["head_pow"] = U(0.055, 0.07), U(1.6, 2.4)
  p["z_back"] = U(1.035, 1.05)  # depth at the silhouette
  # Nose: ridge from between the eyes to the tip, wider towards the tip.
  p["nose_h"] = U(0.03, 0.045)
  p["nose_tip_v"] = p["cy"] + U(0.08, 0.18)
  p["nose_len"] = U(0.33, 0.45)
  p["nose_w"] = U(0.06, 0.09)
  # Eyes, brows, cheeks, mouth, chin.
  p["eye_u"], p["eye_v"] = U(0.30, 0.38), p["cy"] + U(-0.30, -0.18)
  p["eye_h"] = U(0.008, 0.016)
  p["brow_dv"], p["brow_h"] = U(0.14, 0.2), U(0.004, 0.01)
  p["cheek_u"], p["cheek_v"], p["cheek_h"] = U(0.35, 0.45), U(0.05, 0.15), U(0.004, 0.012)
  p["mouth_v"] = p["nose_tip_v"] + U(0.25, 0.32)
  p["lip_h"], p["lip_w"] = U(0.005, 0.01), U(0.16, 0.22)
  p["chin_dv"], p["chin_h"] = U(0.24, 0.3), U(0.006, 0.012)
  # Albedo.
  t = U(0.0, 1.0)
  light_skin, dark_skin = np.array([0.92, 0.76, 0.64]), np.array([0.42, 0.28, 0.2])
  p["skin"] = ((1 - t) * light_skin + t * dark_skin) * U(0.94, 1.06, size=3)
  p["hair"] = U(0.05, 0.45) * np.array([1.0, 0.8, 0.6]) * U(0.8, 1.2, size=3)
  hairline, has_hair = U(0.55, 0.8), U() < 0.7
  p["hairline"] = hairline if has_hair else 2.0  # 2.0: above the head, no hair
  p["brow_dark"] = U(0.6, 0.95)
  p["iris"] = U(0.05, 0.45, size=3)
  p["lip_col"] = p["skin"] * np.array([1.0, 0.6, 0.62]) * U(0.7, 0.9)
  p["blush"] = U(0.0, 0.08)
  # Smooth texture: random low-frequency Fourier features (fu, fv, phase, amp).
  p["tex_amp"] = U(0.03, 0.08)
  p["tex"] = np.stack([U(-3, 3, 8), U(-3, 3, 8), U(0, 2 * np.pi, 8),
                       U(-1, 1, 8)], axis=1)
  p["asym"] = np.stack([U(-2, 2, 6), U(-2, 2, 6), U(0, 2 * np.pi, 6)], axis=1)
  # View (radians / metric) and light.
  deg = np.deg2rad
  p["view"] = np.array([
      U(-1, 1) * deg(cfg.max_pitch_deg), U(-1, 1) * deg(cfg.max_yaw_deg),
      U(-1, 1) * deg(cfg.max_roll_deg), U(-1, 1) * cfg.max_shift,
      U(-1, 1) * cfg.max_shift, 0.0], np.float32)
  p["light"] = np.array([U(*cfg.ambient_range), U(*cfg.diffuse_range),
                         U(-1, 1) * cfg.max_light_dxy,
                         U(-1, 1) * cfg.max_light_dxy], np.float32)
  if cfg.albedo not in _ALBEDO_FAMILIES:
    raise UserError(f"GenConfig albedo must be one of {', '.join(_ALBEDO_FAMILIES)}, "
                    f"got {cfg.albedo!r}")
  if cfg.albedo == "blotch":
    # Drawn last, so the default family's streams (and data) stay unchanged.
    p["base"] = U(0.15, 0.9, size=3)
    # Blotches (u >= 0, mirrored): centre u, v, size su, sv, alpha; colours.
    p["blotch"] = np.stack([U(0.0, 0.7, 6), U(-0.8, 0.8, 6), U(0.05, 0.2, 6),
                            U(0.05, 0.2, 6), U(0.5, 0.9, 6)], axis=1)
    p["blotch_col"] = U(0.05, 0.95, size=(6, 3))
  return p


# ----------------------------------------------------------------------------
# Canonical (frontal, symmetric) face (numpy) and its rendering (JAX)
# ----------------------------------------------------------------------------

def _gauss(u, v, cu, cv, su, sv):
  """Axis-aligned Gaussian; separable, so u_1xS and v_Sx1 cost 2S exps, not S^2."""
  return np.exp(-0.5 * ((u - cu) / su) ** 2) * np.exp(-0.5 * ((v - cv) / sv) ** 2)


def _pair(u, v, cu, cv, su, sv):
  """A Gaussian and its mirror image across u = 0."""
  return _gauss(u, v, cu, cv, su, sv) + _gauss(u, v, -cu, cv, su, sv)


def _smoothstep(x):
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3 - 2 * x)


def _fourier(u, v, feats_Kx4):
  """Smooth random field: mean_k amp_k cos(2 pi (fu_k u + fv_k v) + phase_k),
  for u_1xS, v_Sx1 (cos(a + b) expanded so that only 1-D cos/sin are needed)."""
  fu, fv, ph = (feats_Kx4[:, i, None, None] for i in range(3))
  amp = feats_Kx4[:, 3, None, None] if feats_Kx4.shape[1] > 3 else 1.0
  a, b = 2 * np.pi * fu * u + ph, 2 * np.pi * fv * v  # K x 1 x S, K x S x 1
  return np.mean(amp * (np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)), axis=0)


def _sym(x_HxW):
  """Exactly left-right symmetric part (x + flip x) / 2: a + b == b + a in IEEE."""
  return 0.5 * (x_HxW + x_HxW[:, ::-1])


def _antisym(x_HxW):
  return 0.5 * (x_HxW - x_HxW[:, ::-1])


def canonical_face(p: dict, size: int, cfg: GenConfig = GenConfig()):
  """Canonical depth, albedo and silhouette of one sample (numpy, float32).

  p: `sample_params` output. Returns (depth_SxS metric,
  albedo_SxSx3 in [0, 1], mask_SxS bool). Depth and albedo are defined
  everywhere (the surface continues flat beyond the silhouette) so bilinear
  sampling at the edge never blends in black; the mask says which pixels
  belong to the object. All shapes are functions of continuous (u, v), so one
  seed gives the same face at every resolution.
  """
  c = (size - 1) / 2.0
  g = ((np.arange(size) - c) / c).astype(np.float32)
  # u right (1xS), v down (Sx1), in [-1, 1]; fields broadcast to SxS.
  u, v = g[None, :], g[:, None]

  # Silhouette: an egg, narrower below the centre (jaw).
  dv = v - p["cy"]
  a_eff = p["a"] * (1.0 - p["egg"] * np.clip(dv / p["b"], 0.0, 1.0))
  r2 = (u / a_eff) ** 2 + (dv / p["b"]) ** 2
  mask = r2 < 1.0
  inner = np.clip(1.0 - r2, 0.0, 1.0)
  # Flat front, sides falling off with a finite slope at the outline (an
  # ellipsoid's vertical edge would make the outline jagged from row to row).
  h = p["head_h"] * (1.0 - np.minimum(r2, 1.0) ** p["head_pow"])
  # Features fade out before the silhouette so its depth is z_back all round.
  env = _smoothstep(inner / 0.35)

  # Nose: ridge rising from the bridge to the tip, then a tip bulb and wings.
  tip, length = p["nose_tip_v"], p["nose_len"]
  bridge = tip - length
  t = np.clip((v - bridge) / length, 0.0, 1.0)
  below = np.exp(-0.5 * (np.maximum(v - tip, 0.0) / 0.05) ** 2)
  above = np.exp(-0.5 * (np.minimum(v - bridge, 0.0) / 0.08) ** 2)
  w = p["nose_w"] * (1.0 + 0.7 * t)
  ridge = (0.3 + 0.7 * t ** 1.5) * np.exp(-0.5 * (u / w) ** 2) * below * above
  feats = p["nose_h"] * (0.85 * ridge + 0.2 * _gauss(u, v, 0, tip, 0.07, 0.06))
  feats += 0.25 * p["nose_h"] * _pair(u, v, 0.1, tip + 0.03, 0.05, 0.04)
  # Eye sockets (with a hint of the eyeball), brow ridge, cheeks.
  eu, ev = p["eye_u"], p["eye_v"]
  feats -= p["eye_h"] * _pair(u, v, eu, ev, 0.15, 0.1)
  feats += 0.35 * p["eye_h"] * _pair(u, v, eu, ev + 0.01, 0.07, 0.045)
  feats += p["brow_h"] * _pair(u, v, 0.9 * eu, ev - p["brow_dv"], 0.2, 0.06)
  cheek_v = p["cy"] + p["cheek_v"]
  feats += p["cheek_h"] * _pair(u, v, p["cheek_u"], cheek_v, 0.15, 0.15)
  # Lips (upper and lower) and chin.
  mv = p["mouth_v"]
  feats += p["lip_h"] * (_gauss(u, v, 0, mv - 0.04, p["lip_w"], 0.045)
                         + _gauss(u, v, 0, mv + 0.05, 0.9 * p["lip_w"], 0.05))
  feats += p["chin_h"] * _gauss(u, v, 0, mv + p["chin_dv"], 0.2, 0.1)
  depth = _sym(p["z_back"] - (h + env * feats))

  # Albedo: skin with a smooth texture, blush, hair, brows, eyes, lips
  # (family "skin"), or a base colour with colour blotches (family "blotch").
  tex = 1.0 + p["tex_amp"] * _fourier(u, v, p["tex"])

  def mix(img, col, alpha):
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    return img * (1 - alpha) + np.asarray(col)[None, None] * alpha

  if cfg.albedo == "blotch":
    alb = p["base"][None, None] * tex[..., None]
    for (bu, bv, su, sv, a), col in zip(p["blotch"], p["blotch_col"]):
      alb = mix(alb, col, a * _pair(u, v, bu, bv, su, sv))
  else:
    alb = p["skin"][None, None] * tex[..., None]
    blush = p["blush"] * _pair(u, v, p["cheek_u"], cheek_v, 0.14, 0.12)
    alb = alb + blush[..., None] * np.array([1.0, -0.5, -0.5])
    alb = mix(alb, p["hair"], _smoothstep((p["cy"] - p["hairline"] * p["b"] - v) / 0.12 + 0.5))
    alb = mix(alb, p["hair"], p["brow_dark"] * _pair(u, v, eu, ev - 0.16, 0.14, 0.035))
  alb = mix(alb, np.array([0.9, 0.88, 0.85]), 0.9 * _pair(u, v, eu, ev + 0.01, 0.09, 0.035))
  alb = mix(alb, p["iris"], _pair(u, v, eu, ev + 0.01, 0.035, 0.035))
  alb = mix(alb, p["lip_col"], 0.9 * _gauss(u, v, 0, mv, p["lip_w"] * 0.95, 0.06))
  alb = mix(alb, p["lip_col"] * 0.4, 0.7 * _gauss(u, v, 0, mv, p["lip_w"] * 0.9, 0.015))
  alb = mix(alb, p["skin"] * 0.35, 0.6 * _pair(u, v, 0.06, tip + 0.06, 0.03, 0.02))
  alb = np.stack([_sym(alb[..., k]) for k in range(3)], axis=-1)

  if cfg.asymmetry:
    f = _antisym(_fourier(u, v, p["asym"]) * env)
    depth = depth + cfg.asymmetry * _ASYM_DEPTH * f
    alb = alb + cfg.asymmetry * _ASYM_ALBEDO * f[..., None]
  depth = np.clip(depth, cfg.min_depth, cfg.max_depth)
  return depth.astype(np.float32), np.clip(alb, 0.0, 1.0).astype(np.float32), mask


@functools.lru_cache(maxsize=None)
def _render_fn(cam: render.Camera):
  """jit of: for each sample (sequentially, lax.map) shade the canonical face
  and render it into its view. lax.map, not vmap: the renderer's
  data-dependent while loops run slower batched on CPU."""

  def one(p):
    depth, albedo, mask, light = p["depth"], p["albedo"], p["mask"], p["light"]
    shading = render.shade(render.depth_to_normals(depth, cam), light[0],
                           light[1], light[2:4])
    canon = jnp.clip(albedo * shading[..., None], 0.0, 1.0)
    # A face is part of the object only if its 3 vertices are: faces touching
    # the background would stretch into walls under rotation.
    face_valid = jnp.all(render.grid_triangles(mask[None])[:, 0], axis=0)
    out = render.render_view(depth, canon, p["view"], cam, face_valid_F=face_valid)
    return dict(image=out["image"], depth=out["depth"], mask=out["mask"] > 0.5,
                canon_image=canon)

  return jax.jit(lambda batch: jax.lax.map(one, batch))


def _pad(x_NxD: np.ndarray, chunk: int) -> np.ndarray:
  """Pads a batch to `chunk` by repeating its last sample: a fixed compiled
  shape, so a sample is bitwise the same whatever batch it is rendered in."""
  return x_NxD[np.minimum(np.arange(chunk), len(x_NxD) - 1)]


def iter_split(n: int, size: int, seed: int = 0, split: str = "train",
               cfg: GenConfig = GenConfig(), start: int = 0,
               with_canonical: bool = False) -> Iterator[dict]:
  """Yields the samples [start, start + n) of a split in batches of cfg.chunk.

  Each batch is a dict as `generate_split` returns.
  """
  if size < 4:
    raise UserError(f"image size must be >= 4, got {size}")
  if n < 0:
    raise UserError(f"number of samples must be >= 0, got {n}")
  fn = _render_fn(cfg.camera(int(size)))
  for s in range(start, start + n, cfg.chunk):
    idx = range(s, min(s + cfg.chunk, start + n))
    params = [sample_params(sample_rng(seed, split, i), cfg) for i in idx]
    depth, albedo, mask = (np.stack(x) for x in zip(*[
        canonical_face(p, size, cfg) for p in params]))
    lights = np.stack([p["light"] for p in params])
    views = np.stack([p["view"] for p in params])
    inputs = dict(depth=depth, albedo=albedo, mask=mask, light=lights, view=views)
    out = fn({k: _pad(x, cfg.chunk) for k, x in inputs.items()})
    out = {k: np.asarray(x)[:len(idx)] for k, x in out.items()}
    # Ground truth: background at max_depth (what Unsup3D's synface PNGs hold).
    gt = np.where(out["mask"], out["depth"], cfg.max_depth).astype(np.float32)
    batch = dict(
        images=np.round(np.clip(out["image"], 0, 1) * 255).astype(np.uint8),
        depth=gt, mask=out["mask"],
        views=views, lights=lights, names=[f"{i:06d}" for i in idx])
    if with_canonical:
      batch.update(canon_depth=depth, canon_albedo=albedo, canon_mask=mask,
                   canon_image=out["canon_image"])
    yield batch


def _concat(batches: list, size: int) -> dict:
  if not batches:
    return dict(images=np.zeros((0, size, size, 3), np.uint8),
                depth=np.zeros((0, size, size), np.float32),
                mask=np.zeros((0, size, size), bool),
                views=np.zeros((0, 6), np.float32),
                lights=np.zeros((0, 4), np.float32), names=[])
  out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k != "names"}
  out["names"] = [x for b in batches for x in b["names"]]
  return out


def generate_split(n: int, size: int, seed: int = 0, split: str = "train",
                   cfg: GenConfig = GenConfig(), start: int = 0,
                   with_canonical: bool = False) -> dict:
  """Generates n samples of one split.

  Returns dict: images uint8 NxSxSx3 (black background), depth float32 NxSxS
  (metric z, background = cfg.max_depth), mask bool NxSxS (object pixels),
  views float32 Nx6 (rx, ry, rz, tx, ty, tz), lights float32 Nx4 (ambient,
  diffuse, dx, dy), names ["000000", ...]. With with_canonical also the
  canonical canon_depth, canon_albedo, canon_mask, canon_image.
  """
  return _concat(list(iter_split(n, size, seed, split, cfg, start, with_canonical)),
                 size)


def generate_splits(size: int, n_train: int = 800, n_val: int = 100,
                    n_test: int = 100, seed: int = 0,
                    cfg: GenConfig = GenConfig()) -> dict:
  """{split: generate_split(...)} for train/val/test (8:1:1 by default)."""
  counts = dict(train=n_train, val=n_val, test=n_test)
  return {s: generate_split(counts[s], size, seed, s, cfg) for s in SPLITS}


# ----------------------------------------------------------------------------
# Ground-truth sidecar: {split}/gt.npz
# ----------------------------------------------------------------------------

GT_FILE = "gt.npz"
GT_CONVENTION = (
    "view: (rx, ry, rz, tx, ty, tz), rotations in RADIANS (rx = pitch, ry = yaw, "
    "rz = roll), R = Rz Ry Rx about (0, 0, rot_center_depth), P' = R (P - c) + c + t, as "
    "render.py and model.view_from_raw; light: (ambient, diffuse, dx, dy), shading = "
    "ambient + diffuse * max(0, n . normalize(dx, dy, 1)) in the canonical frame, as "
    "model.light_from_raw; canon_depth: metric z of the canonical (frontal) face, "
    "stored as uint16 u = round(65535 (1.1 - z) / 0.2) (the depth PNG mapping); "
    "canon_albedo: uint8 RGB / 255 (the model's albedo / 2 + 0.5); canon_mask: "
    "silhouette of the canonical face")


def _gt_arrays(batches: list) -> dict:
  """Sidecar arrays of a list of `iter_split(..., with_canonical=True)` batches."""
  cat = lambda k: np.concatenate([b[k] for b in batches]) if batches else None
  if not batches:
    return dict(names=np.zeros((0,), "<U6"), view=np.zeros((0, 6), np.float32),
                light=np.zeros((0, 4), np.float32))
  return dict(
      names=np.asarray([x for b in batches for x in b["names"]]),
      view=cat("views").astype(np.float32), light=cat("lights").astype(np.float32),
      canon_depth=np.round(depth_to_png_value(cat("canon_depth")) * 65535).astype(np.uint16),
      canon_albedo=np.round(np.clip(cat("canon_albedo"), 0, 1) * 255).astype(np.uint8),
      canon_mask=cat("canon_mask").astype(bool))


def _save_gt(path: str, arrays: dict):
  np.savez_compressed(path, convention=np.asarray(GT_CONVENTION), **arrays)


def canonical_gt(n: int, size: int, seed: int = 0, split: str = "train",
                 cfg: GenConfig = GenConfig(), start: int = 0) -> dict:
  """The sidecar arrays of samples [start, start + n) WITHOUT rendering them
  (views, lights and canonical maps only depend on the parameters): used to
  add the sidecar to data exported before it existed. Same values as the
  export writes."""
  batches = []
  for s in range(start, start + n, cfg.chunk):
    idx = range(s, min(s + cfg.chunk, start + n))
    params = [sample_params(sample_rng(seed, split, i), cfg) for i in idx]
    depth, albedo, mask = (np.stack(x) for x in zip(*[
        canonical_face(p, size, cfg) for p in params]))
    batches.append(dict(names=[f"{i:06d}" for i in idx],
                        views=np.stack([p["view"] for p in params]),
                        lights=np.stack([p["light"] for p in params]),
                        canon_depth=depth, canon_albedo=albedo, canon_mask=mask))
  return _gt_arrays(batches)


def write_missing_gt(root: str, verbose: bool = True) -> list:
  """Adds {split}/gt.npz to a folder exported by this generator (meta.json
  with generator scr_jax.data) before sidecars existed. Returns the splits
  written (none when every sidecar is there or the folder is not ours)."""
  path = os.path.join(root, "meta.json")
  if not os.path.isfile(path):
    return []
  with open(path) as fh:
    meta = json.load(fh)
  if meta.get("generator") != "scr_jax.data":
    return []
  cfg = GenConfig.from_json(meta.get("config", {}))
  done = []
  for split, n in meta.get("counts", {}).items():
    out = os.path.join(root, split, GT_FILE)
    if n and os.path.isdir(os.path.join(root, split)) and not os.path.exists(out):
      _save_gt(out, canonical_gt(int(n), int(meta["size"]), int(meta["seed"]), split, cfg))
      done.append(split)
  if done and verbose:
    print(f"[export] wrote the missing ground-truth sidecars ({', '.join(done)}) "
          f"under {root}", flush=True)
  return done


def load_gt(root: str, split: str, names, image_size=None, crop=None,
            camera: render.Camera | None = None):
  """Reads {root}/{split}/gt.npz for the samples `names` (in that order).

  Canonical maps are resized like the images (bilinear, metric depth) when
  image_size differs from the stored size. Returns None (with a note on
  stderr where it matters) when there is no sidecar (real data), when a name
  has no entry, when a crop is asked for (a crop changes the camera, so the
  generator's views no longer apply), or when `camera`'s fov / depth range
  differ from the generator's (meta.json).
  Returns dict: view Nx6 (radians, see GT_CONVENTION), light Nx4,
  canon_depth NxSxS float32 metric, canon_albedo NxSxSx3 float32 in [0, 1],
  canon_mask NxSxS bool.
  """
  path = os.path.join(root, split, GT_FILE)
  if not os.path.isfile(path) or not len(names):
    return None
  if crop:
    print(f"note: {path}: not used with crop={crop} (a crop changes the camera)",
          file=sys.stderr, flush=True)
    return None
  meta_path = os.path.join(root, "meta.json")
  if camera is not None and os.path.isfile(meta_path):
    with open(meta_path) as fh:
      gen = GenConfig.from_json(json.load(fh).get("config", {}))
    if (gen.fov_deg, gen.min_depth, gen.max_depth) != (
        camera.fov_deg, camera.min_depth, camera.max_depth):
      print(f"note: {path}: not used, the data's camera (fov {gen.fov_deg}, depth "
            f"{gen.min_depth}-{gen.max_depth}) differs from the model's", file=sys.stderr,
            flush=True)
      return None
  try:
    with np.load(path) as z:
      arr = {k: z[k] for k in z.files}
  except Exception as e:  # a damaged sidecar only costs the diagnostics
    print(f"note: {path}: unreadable ({type(e).__name__}), diagnostics skipped",
          file=sys.stderr, flush=True)
    return None
  index = {str(n): i for i, n in enumerate(arr["names"])}
  missing = [n for n in names if str(n) not in index]
  if missing:
    print(f"note: {path}: no entry for {missing[0]} ({len(missing)} in all), diagnostics "
          "skipped", file=sys.stderr, flush=True)
    return None
  sel = np.asarray([index[str(n)] for n in names], np.int64)
  depth = png_value_to_depth(arr["canon_depth"][sel].astype(np.float32) / 65535.0)
  albedo = arr["canon_albedo"][sel].astype(np.float32) / 255.0
  mask = arr["canon_mask"][sel]
  if image_size is not None and depth.shape[-1] != int(image_size):
    rs = lambda a: _resize_plane(a, int(image_size))
    depth = np.stack([rs(d) for d in depth]) if len(depth) else depth
    albedo = np.stack([np.stack([rs(a[..., k]) for k in range(3)], -1) for a in albedo])
    mask = np.stack([rs(m.astype(np.float32)) > 0.5 for m in mask])
  return dict(view=arr["view"][sel].astype(np.float32),
              light=arr["light"][sel].astype(np.float32),
              canon_depth=depth.astype(np.float32), canon_albedo=albedo.astype(np.float32),
              canon_mask=mask.astype(bool))


# ----------------------------------------------------------------------------
# Depth <-> PNG
# ----------------------------------------------------------------------------

def depth_to_png_value(z):
  """Metric depth -> Unsup3D PNG value v in [0, 1] (bright = near)."""
  return np.clip((_PNG_DEPTH_MID + _PNG_DEPTH_HALF - np.asarray(z, np.float64))
                 / (2 * _PNG_DEPTH_HALF), 0.0, 1.0)


def png_value_to_depth(v):
  """Unsup3D PNG value v in [0, 1] -> metric depth z = 1 + 0.1 ((1 - v) 2 - 1)."""
  v = np.asarray(v, np.float32)
  return (_PNG_DEPTH_MID + _PNG_DEPTH_HALF * ((1.0 - v) * 2.0 - 1.0)).astype(np.float32)


def _save_depth_png(path, z_HxW, bits):
  v = depth_to_png_value(z_HxW)
  if bits == 16:
    Image.fromarray(np.round(v * 65535).astype(np.uint16)).save(path)
  elif bits == 8:  # Unsup3D's own files: 8-bit RGB, all channels equal
    q = np.round(v * 255).astype(np.uint8)
    Image.fromarray(np.repeat(q[..., None], 3, axis=-1)).save(path)
  else:
    raise UserError(f"depth_bits must be 8 or 16, got {bits}")


# ----------------------------------------------------------------------------
# Export to the Unsup3D synface layout
# ----------------------------------------------------------------------------

def export_synface(out_dir: str, n_train: int = 800, n_val: int = 100,
                   n_test: int = 100, size: int = 64, seed: int = 0,
                   depth_bits: int = 16, cfg: GenConfig = GenConfig(),
                   verbose: bool = True, overwrite: bool = False) -> dict:
  """Writes generated splits as DIR/{split}/{image,depth}/NNNNNN_{image,depth}.png,
  the ground-truth sidecar DIR/{split}/gt.npz (views, lights, canonical depth,
  albedo and mask: see GT_CONVENTION, `load_gt`) and DIR/meta.json. Returns
  the meta dict.

  A folder that already holds synface PNGs is refused unless overwrite=True,
  which first deletes them (stale extra files would silently join a split).
  """
  if depth_bits not in (8, 16):
    raise UserError(f"depth_bits must be 8 or 16, got {depth_bits}")
  for split in SPLITS:
    for sub, suffix in (("image", "_image.png"), ("depth", "_depth.png")):
      folder = os.path.join(out_dir, split, sub)
      old = _list_files(folder, [suffix]) if os.path.isdir(folder) else []
      if old and not overwrite:
        raise UserError(f"{folder}: already holds {len(old)} *{suffix} files "
                        "(replace them with --overwrite, overwrite=True in Python)")
      for f in old:
        os.remove(os.path.join(folder, f))
  counts = dict(train=n_train, val=n_val, test=n_test)
  meta = dict(generator="scr_jax.data", size=size, seed=seed, counts=counts,
              depth_bits=depth_bits, config=cfg.to_json(),
              depth_png="z = 1.0 + 0.1 * ((1 - v) * 2 - 1), v in [0, 1]",
              gt=f"{{split}}/{GT_FILE}: {GT_CONVENTION}")
  os.makedirs(out_dir, exist_ok=True)
  tty = sys.stdout.isatty()
  cr = "\r" if tty else ""
  for split in SPLITS:
    img_dir = os.path.join(out_dir, split, "image")
    dep_dir = os.path.join(out_dir, split, "depth")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(dep_dir, exist_ok=True)
    t0, done, gt = time.time(), 0, []
    for batch in iter_split(counts[split], size, seed, split, cfg, with_canonical=True):
      for img, z, name in zip(batch["images"], batch["depth"], batch["names"]):
        Image.fromarray(img).save(os.path.join(img_dir, f"{name}_image.png"))
        _save_depth_png(os.path.join(dep_dir, f"{name}_depth.png"), z, depth_bits)
      gt.append({k: batch[k] for k in ("names", "views", "lights", "canon_depth",
                                       "canon_albedo", "canon_mask")})
      done += len(batch["names"])
      if verbose and tty:  # a live counter only where \r works (not in logs)
        print(f"\r[export] {split}: {done}/{counts[split]}", end="", flush=True)
    _save_gt(os.path.join(out_dir, split, GT_FILE), _gt_arrays(gt))
    if verbose:
      print(f"{cr}[export] {split}: {done} samples {size}x{size} in "
            f"{time.time() - t0:.1f}s -> {os.path.join(out_dir, split)}", flush=True)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


# ----------------------------------------------------------------------------
# Reading images safely: one reader for train, eval and predict
# ----------------------------------------------------------------------------

# Background of the built-in data, RGB in [0, 1]. The generator renders each
# face with `render.render_view`, which leaves every pixel the surface does not
# cover at 0: black. Transparent pixels of an input image are composited onto
# this colour, so a cut-out face looks like what the model saw in training.
TRAIN_BACKGROUND_RGB = (0.0, 0.0, 0.0)
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


# Formats Pillow registers but cannot decode by itself: video (MPEG, only
# identified), PostScript (needs Ghostscript) and IPTC metadata files.
_NOT_PICTURES = ("MPEG", "EPS", "IPTC")


@functools.lru_cache(maxsize=None)
def image_extensions() -> tuple:
  """Extensions (lower case, with the dot) of every picture format this Pillow
  decodes: taken from its registered plugins (PNG, JPEG, WebP, BMP, TIFF, GIF,
  AVIF, ...), so the folder loaders read whatever the installed Pillow reads.
  Left out: identify-only stubs (HDF5, GRIB, BUFR, WMF) and _NOT_PICTURES.
  """
  exts = Image.registered_extensions()  # imports Pillow's plugins once

  def decodes(fmt):
    factory = Image.OPEN.get(fmt, (None,))[0]
    stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
    return factory is not None and not stub and fmt not in _NOT_PICTURES

  return tuple(sorted(e.lower() for e, fmt in exts.items() if decodes(fmt)))


def _open_image(path: str) -> Image.Image:
  """Opens and fully decodes an image; any failure is a one-line UserError."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: empty file (0 bytes)")
  img = None
  try:
    img = Image.open(path)
    # The stored sample format ('RGB;16B' for a 48-bit PNG, which Pillow
    # decodes to 8-bit RGB): read_depth_png needs it to keep 16-bit precision.
    raw = img.tile[0].args if img.tile else None
    img.load()  # PIL decodes lazily: truncation only shows up here
    img.info["scr_rawmode"] = raw if isinstance(raw, str) else ""
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    if img is not None:
      img.close()
    if isinstance(e, UnidentifiedImageError):
      why = "unknown format or corrupt header"
    else:
      why = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path}: not a readable image ({why})") from None
  return img


def _upright(img: Image.Image, path: str, notes=None) -> Image.Image:
  """Applies the EXIF orientation tag (phones store the sensor's pixels and
  say in the tag how to turn them); orientation 1 or no tag: unchanged."""
  try:
    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # a broken EXIF block: the pixels are still usable
    orientation = 1
    if notes is not None:
      notes.setdefault("unreadable EXIF data, orientation not applied", []).append(path)
  if orientation not in range(2, 9):
    return img
  if notes is not None:
    notes.setdefault("turned upright by its EXIF orientation tag", []).append(
        f"{path} (orientation {orientation})")
  return ImageOps.exif_transpose(img)


def _has_alpha(img: Image.Image) -> bool:
  return img.has_transparency_data and img.mode not in _16BIT_MODES + ("F",)


def _to_rgb_float(img: Image.Image, background=TRAIN_BACKGROUND_RGB) -> np.ndarray:
  """Any PIL image -> float32 HxWx3 in [0, 1].

  Grayscale is replicated to 3 channels; palette images are expanded; 16-bit
  grayscale is scaled by 1/65535; transparency (RGBA, LA, PA, palette or
  grayscale with a transparent colour) is composited onto `background` (RGB
  in [0, 1]): rgb * alpha + background * (1 - alpha).
  """
  if img.mode in _16BIT_MODES:
    a = np.asarray(img, np.float32) / 65535.0
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if img.mode == "F":
    a = np.asarray(img, np.float32)
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if _has_alpha(img):
    rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
    alpha = rgba[..., 3:]
    bg = np.asarray(background, np.float32).reshape(1, 1, 3)
    return (rgba[..., :3] * alpha + bg * (1.0 - alpha)).astype(np.float32)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.float32) / 255.0


def _note_mode(notes: dict, path: str, img: Image.Image):
  """Records a non-fatal conversion of an input image, reported by _report."""
  if img.mode == "RGB":
    return
  if _has_alpha(img) and np.asarray(img.convert("RGBA"))[..., 3].min() < 255:
    what = (f"mode {img.mode}, transparent pixels composited onto the training "
            f"background RGB {TRAIN_BACKGROUND_RGB} (black)")
  else:
    what = f"mode {img.mode}, converted to RGB"
  notes.setdefault(what, []).append(path)


def read_image(path: str, notes=None, background=TRAIN_BACKGROUND_RGB) -> np.ndarray:
  """The one image reader of train, eval and predict.

  Decodes any format Pillow opens, turns the image upright by its EXIF
  orientation, composites transparency onto `background` (default: the
  built-in data's TRAIN_BACKGROUND_RGB) and converts to RGB.

  Args:
    path: image file.
    notes: optional dict collecting non-fatal conversions (see _report).
    background: RGB in [0, 1] behind transparent pixels.
  Returns:
    float32 HxWx3 in [0, 1] (H, W after the EXIF rotation).
  Raises:
    UserError: missing, empty, truncated or unreadable file (one line).
  """
  img = _open_image(path)
  try:
    img = _upright(img, path, notes)
    if notes is not None:
      _note_mode(notes, path, img)
    return _to_rgb_float(img, background)
  finally:
    img.close()


_DEPTH_FORMS = ("depth PNGs must be grayscale (8- or 16-bit) or RGB with R = G = B "
                "(Unsup3D's files)")


def _to_png_value(img: Image.Image, path: str) -> np.ndarray:
  """Depth PNG -> v in [0, 1]: 16-bit grayscale / 65535 (full precision),
  8-bit gray / 255, or RGB whose channels are equal (channel 0 / 255).

  An RGB depth whose channels differ is a colour-mapped picture of depth (jet,
  viridis, ...): its scale is per-file and unknown, so it is refused rather
  than read as channel 0 (which would be a silently wrong depth).
  """
  if img.mode in _16BIT_MODES:
    a = np.asarray(img, np.float32)
    if img.mode == "I" and (a.min() < 0 or a.max() > 65535):
      raise UserError(f"{path}: 32-bit depth values outside 0..65535; {_DEPTH_FORMS}")
    return a / 65535.0
  if img.mode in ("L", "LA", "1"):
    return np.asarray(img.convert("L"), np.float32) / 255.0
  if img.mode in ("RGB", "RGBA", "P", "PA"):
    a = np.asarray(img.convert("RGB"), np.int16)
    diff = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 0] - a[..., 2]))
    n_bad = int(np.count_nonzero(diff))
    if n_bad:
      raise UserError(
          f"{path}: colour-mapped depth (R, G, B differ at {n_bad} of {diff.size} pixels, "
          f"by up to {int(diff.max())} levels); {_DEPTH_FORMS}: a colour map loses the "
          "depth scale, so it is not converted")
    return a[..., 0].astype(np.float32) / 255.0
  raise UserError(f"{path}: unsupported depth image mode {img.mode}; {_DEPTH_FORMS}")


def _rgb16_png_value(path: str) -> np.ndarray:
  """v in [0, 1] of a 16-bit-per-channel RGB depth PNG with R = G = B.

  Pillow decodes such files to 8 bits per channel, so OpenCV reads them."""
  try:
    import cv2
  except ImportError:
    raise UserError(f"{path}: 16-bit RGB depth needs OpenCV to keep its precision (pip "
                    "install opencv-python-headless==4.*), or save it as 16-bit grayscale"
                    ) from None
  a = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if a is None or a.dtype != np.uint16 or a.ndim != 3:
    raise UserError(f"{path}: not a readable 16-bit RGB depth; {_DEPTH_FORMS}")
  a = a[..., :3].astype(np.int32)
  diff = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 0] - a[..., 2]))
  if np.count_nonzero(diff):
    raise UserError(f"{path}: colour-mapped depth (16-bit R, G, B differ at "
                    f"{np.count_nonzero(diff)} of {diff.size} pixels); {_DEPTH_FORMS}")
  return a[..., 0].astype(np.float32) / 65535.0


def read_depth_png(path: str, notes=None) -> np.ndarray:
  """Depth PNG (Unsup3D's convention) -> metric depth z, float32 HxW.

  v in [0, 1] (16-bit / 65535, also 16-bit RGB with R = G = B, or 8-bit / 255)
  maps to z = 1 + 0.1 ((1 - v) 2 - 1). Raises UserError for unreadable files
  and colour-mapped (channel-unequal) RGB.
  """
  img = _open_image(path)
  try:
    if img.mode in ("RGB", "RGBA") and ";16" in img.info.get("scr_rawmode", ""):
      return png_value_to_depth(_rgb16_png_value(path))
    return png_value_to_depth(_to_png_value(_upright(img, path, notes), path))
  finally:
    img.close()


def _crop_box(w: int, h: int, crop, path: str):
  """Centre square crop box (torchvision's rounding). crop=None: the largest
  centred square (images that are already square are left alone)."""
  side = min(w, h) if crop is None else int(crop)
  if side <= 0:
    raise UserError(f"crop must be positive, got {crop}")
  if side > w or side > h:
    raise UserError(f"{path}: crop {side} is larger than the image ({w}x{h})")
  top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
  return left, top, side


def _resize_plane(a_HxW: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of one float plane with PIL (antialiased when shrinking,
  like torchvision's resize of PIL images in Unsup3D)."""
  if a_HxW.shape == (size, size):
    return a_HxW.astype(np.float32)
  im = Image.fromarray(a_HxW.astype(np.float32), mode="F")
  return np.asarray(im.resize((size, size), Image.BILINEAR), np.float32)


def _resize(a, image_size):
  if image_size is None or int(image_size) == a.shape[0]:
    return np.ascontiguousarray(a, np.float32)
  size = int(image_size)
  if size < 1:
    raise UserError(f"image_size must be positive, got {image_size}")
  if a.ndim == 2:
    return _resize_plane(a, size)
  return np.stack([_resize_plane(a[..., k], size) for k in range(a.shape[-1])], -1)


def crop_resize(a_HxWxC: np.ndarray, image_size, crop=None, path: str = "array"):
  """Centre-crop to `crop` px (None: largest square), then bilinear resize to
  image_size (None: keep). Works on HxW or HxWxC float arrays."""
  h, w = a_HxWxC.shape[:2]
  left, top, side = _crop_box(w, h, crop, path)
  return _resize(a_HxWxC[top:top + side, left:left + side], image_size)


def crop_box_resize(a_HxWxC: np.ndarray, left: int, top: int, side: int, image_size):
  """Square crop [top, top + side) x [left, left + side) that may reach past
  the image (the border pixels are replicated there, as Unsup3D's CelebA and
  demo crops do), then bilinear resize to image_size (None: keep)."""
  h, w = a_HxWxC.shape[:2]
  if side < 1:
    raise UserError(f"crop box side must be positive, got {side}")
  pad = [(max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w))]
  pad += [(0, 0)] * (a_HxWxC.ndim - 2)
  a = np.pad(a_HxWxC, pad, mode="edge")
  t, l = top + pad[0][0], left + pad[1][0]
  return _resize(a[t:t + side, l:l + side], image_size)


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

def _note_size(notes: dict, path: str, shape, image_size, crop):
  """Records a resize of an image whose size is not the model's."""
  h, w = shape[:2]
  if image_size is not None and crop is None and (w, h) != (int(image_size),) * 2:
    notes.setdefault(f"not {image_size}x{image_size}, centre-cropped and resized",
                     []).append(f"{path} ({w}x{h})")


def _note_ignored(notes: dict, folder: str, suffixes):
  """Records the entries of a folder that a loader skips (wrong name or
  extension, sub-folders)."""
  for f in sorted(os.listdir(folder)):
    p = os.path.join(folder, f)
    if os.path.isdir(p):
      notes.setdefault("a sub-folder, not read", []).append(p)
    elif not f.lower().endswith(tuple(suffixes)):
      notes.setdefault(f"not {' / '.join('*' + x for x in suffixes)}, ignored",
                       []).append(p)


def _report(notes: dict):
  """One stderr line per kind of conversion or skip: the first file and the count."""
  for what, paths in notes.items():
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    print(f"note: {paths[0]}{more}: {what}", file=sys.stderr, flush=True)


def _list_files(folder: str, suffixes) -> list:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(tuple(suffixes))
                and os.path.isfile(os.path.join(folder, f)))


def list_images(folder: str, recursive: bool = True, notes=None, exclude=()) -> list:
  """Image files in a folder (and, by default, its sub-folders), sorted.

  Files are images by their extension (`image_extensions()`: every format
  Pillow opens). Nested layouts such as the Cat dataset's cats/CAT_00/... are
  read with recursive=True. Everything skipped is recorded in `notes`: files
  that are not images (e.g. Cat-dataset *.cat landmark files), hidden entries
  (.DS_Store, .ipynb_checkpoints/), folders in `exclude` (e.g. predict's own
  output folder), and with recursive=False the images in sub-folders. Linked
  folders are followed, each real folder read once.

  Returns:
    list of paths (folder joined with the relative path), sorted by that path.
  Raises:
    UserError: folder missing, a file, or holding no image.
  """
  if os.path.isfile(folder):
    raise UserError(f"{folder}: is a file, not a folder of images (give the folder, or "
                    "the files to predict)")
  if not os.path.isdir(folder):
    raise UserError(f"{folder}: image folder not found")
  exts = image_extensions()
  notes = {} if notes is None else notes
  found, seen = [], set()
  skip = {os.path.realpath(x) for x in exclude}
  for d, dirs, files in os.walk(folder, followlinks=True):
    if os.path.realpath(d) in seen:  # a link back to a folder already read
      notes.setdefault("a link to a folder already read, not read twice", []).append(d)
      dirs[:] = []
      continue
    seen.add(os.path.realpath(d))
    keep = []
    for x in sorted(dirs):
      p = os.path.join(d, x)
      if x.startswith("."):
        notes.setdefault("hidden folder, not read", []).append(p)
      elif os.path.realpath(p) in skip:
        notes.setdefault("the output folder, not read", []).append(p)
      else:
        keep.append(x)
    dirs[:] = keep
    top = os.path.normpath(d) == os.path.normpath(folder)
    for f in sorted(files):
      p = os.path.join(d, f)
      if f.startswith("."):
        notes.setdefault("hidden file, ignored", []).append(p)
      elif not f.lower().endswith(exts):
        notes.setdefault("not an image (by its extension), ignored", []).append(p)
      elif top or recursive:
        found.append(p)
      else:
        notes.setdefault("image in a sub-folder, not read (recursive reading is off)",
                         []).append(p)
  if not found:
    where = " or its sub-folders" if recursive else ""
    raise UserError(f"{folder}: no *.png / *.jpg / *.webp / ... images in it{where} "
                    "(any format Pillow opens)")
  return sorted(found, key=lambda p: os.path.relpath(p, folder))


def load_synface(root: str, split: str = "train", image_size=64, crop=None,
                 limit=None) -> dict:
  """Reads DIR/{split}/{image,depth}/*_{image,depth}.png.

  Optional centre crop to `crop` px (None: the largest centred square, a no-op
  for square images) then bilinear resize to image_size (None: keep), images
  and metric depth alike. Returns dict: images float32 NxHxWx3 in [0, 1],
  depth float32 NxHxW (metric z), names ["NNNNNN", ...] (sorted). Images go
  through `read_image` (EXIF orientation, transparency on the training
  background); depth PNGs may be 16-bit grayscale, 8-bit gray or RGB with
  equal channels (a colour-mapped RGB depth raises UserError).
  """
  if not os.path.isdir(root):
    raise UserError(f"{root}: synface folder not found")
  img_dir = os.path.join(root, split, "image")
  dep_dir = os.path.join(root, split, "depth")
  for d in (img_dir, dep_dir):
    if not os.path.isdir(d):
      raise UserError(f"{d}: missing folder (expected {split}/image and {split}/depth "
                      f"under {root})")
  imgs = {f[:-len("_image.png")]: f for f in _list_files(img_dir, ["_image.png"])}
  deps = {f[:-len("_depth.png")]: f for f in _list_files(dep_dir, ["_depth.png"])}
  if not imgs:
    raise UserError(f"{img_dir}: no *_image.png files")
  for name in sorted(imgs):
    if name not in deps:
      raise UserError(f"{os.path.join(img_dir, imgs[name])}: no depth twin "
                      f"(expected {os.path.join(dep_dir, name + '_depth.png')})")
  for name in sorted(deps):
    if name not in imgs:
      raise UserError(f"{os.path.join(dep_dir, deps[name])}: no image twin "
                      f"(expected {os.path.join(img_dir, name + '_image.png')})")
  names = sorted(imgs)[:limit]
  images, depths, notes = [], [], {}
  _note_ignored(notes, img_dir, ["_image.png"])
  _note_ignored(notes, dep_dir, ["_depth.png"])
  for name in names:
    ip, dp = os.path.join(img_dir, imgs[name]), os.path.join(dep_dir, deps[name])
    im = read_image(ip, notes)
    z = read_depth_png(dp, notes)
    if im.shape[:2] != z.shape:
      raise UserError(f"{dp}: depth is {z.shape[1]}x{z.shape[0]} but its image "
                      f"{ip} is {im.shape[1]}x{im.shape[0]}")
    _note_size(notes, ip, im.shape, image_size, crop)
    images.append(crop_resize(im, image_size, crop, ip))
    # Resize in metric units, not PNG values (the same here: the map is affine).
    depths.append(crop_resize(z, image_size, crop, dp))
  _report(notes)
  return dict(images=np.stack(images), depth=np.stack(depths), names=names)


def load_image_folder(dir_or_files, image_size=64, crop=None, limit=None,
                      recursive: bool = True) -> dict:
  """Reads an image-only folder (any format Pillow opens) or a list of files.

  A folder is listed by `list_images`: sub-folders are read too unless
  recursive=False (the Cat dataset's cats/CAT_00/..., CAT_01/... layout), and
  every file skipped is named in a `note:` line. Each image goes through
  `read_image` (EXIF orientation, transparency composited on the training
  background, RGB). Centre crop to `crop` px (None: the largest centred
  square), then bilinear resize to image_size (None: keep).

  Returns:
    dict: images float32 NxHxWx3 in [0, 1]; names: paths relative to the
    folder without extension, '/'-separated ("CAT_00/0000"; file lists: the
    base name without extension); files: the paths read.
  Raises:
    UserError: missing folder, no image, unreadable file (one line).
  """
  notes = {}
  if isinstance(dir_or_files, (str, os.PathLike)):
    folder = os.fspath(dir_or_files)
    files = list_images(folder, recursive, notes)
    names = [os.path.splitext(os.path.relpath(f, folder))[0].replace(os.sep, "/")
             for f in files]
  else:
    files = [os.fspath(f) for f in dir_or_files]
    if not files:
      raise UserError("load_image_folder: empty file list")
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  files, names = files[:limit], names[:limit]
  images = []
  for f in files:
    img = read_image(f, notes)
    _note_size(notes, f, img.shape, image_size, crop)
    images.append(crop_resize(img, image_size, crop, f))
  _report(notes)
  return dict(images=np.stack(images), names=names, files=files)


# ----------------------------------------------------------------------------
# TFDS (lazy: only imported when used)
# ----------------------------------------------------------------------------

def _tfds_module():
  try:
    from scr_jax import tfds_synface
  except ImportError as e:
    raise UserError(f"TFDS data needs tensorflow-datasets and array_record ({e}); "
                    "use a synface folder instead") from None
  return tfds_synface


def build_tfds(data_dir: str, size: int = 64, n_train: int = 800, n_val: int = 100,
               n_test: int = 100, seed: int = 0, **kw):
  """Lazy alias of tfds_synface.build_tfds; also writes the ground-truth
  sidecars as <builder.data_dir>/{split}/gt.npz (see `load_gt`)."""
  builder = _tfds_module().build_tfds(data_dir, size, n_train, n_val, n_test, seed, **kw)
  cfg = kw.get("cfg", GenConfig())
  for split, n in dict(train=n_train, val=n_val, test=n_test).items():
    path = os.path.join(builder.data_dir, split, GT_FILE)
    if n and not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      _save_gt(path, canonical_gt(n, size, seed, split, cfg))
  return builder


def load_tfds(data_dir: str, split: str = "train", image_size=None, crop=None, **kw):
  """Lazy alias of tfds_synface.load_tfds; adds d["gt"] (`load_gt`) when the
  prepared dataset has a ground-truth sidecar for the split."""
  mod = _tfds_module()
  d = mod.load_tfds(data_dir, split, image_size, crop, **kw)
  root = (data_dir.data_dir if hasattr(data_dir, "data_dir")
          else mod._find_prepared(data_dir, kw.get("config")))
  gt = load_gt(root, split, d["names"], image_size, crop)
  if gt is not None:
    d["gt"] = gt
  return d


# ----------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------

def preview_grid(images, depths, path: str, max_items: int = 8, min_px: int = 64,
                 max_depth: float = 1.1) -> str:
  """Writes a PNG: images on the top row, depths (grayscale, bright = near,
  stretched per image over the object) below. images: NxHxWx3 uint8 or float
  in [0, 1]; depths: NxHxW metric (or None). Returns path."""
  images = np.asarray(images)[:max_items]
  if images.dtype != np.uint8:
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  n, h, w = images.shape[:3]
  scale = max(1, -(-min_px // h))
  rows = [np.concatenate(list(images), axis=1)]
  if depths is not None:
    tiles = []
    for z in np.asarray(depths, np.float32)[:n]:
      fg = z < max_depth - 1e-6
      lo, hi = (z[fg].min(), z[fg].max()) if fg.any() else (0.0, 1.0)
      g = np.where(fg, 0.15 + 0.85 * (hi - z) / max(hi - lo, 1e-6), 0.0)
      tiles.append(np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1))
    rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(rows, axis=0)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
  return path
