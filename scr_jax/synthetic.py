"""The built-in data: a procedural symmetric-face generator with ground truth.

  * `generate_split` / `generate_splits` / `iter_split`: procedural, roughly
    symmetric face-like height fields with ground-truth depth, rendered with
    the project's renderer (`render.render_view`) from a random view and light;
  * `export_synface`: writes them in Unsup3D's synface folder layout (read
    back by `folders.load_synface`, prepared by `prepare.prepare`);
  * the ground-truth sidecar `{split}/gt.npz` (`load_gt`, `write_missing_gt`).
Imports `folders` (depth PNG format, resize) and `render`; nothing imports
back from the dataset stage.
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
from PIL import Image

from scr_jax import cliutil, render
from scr_jax.errors import UserError
from scr_jax.folders import (_list_files, _resize_plane, _save_depth_png,
                             depth_to_png_value, png_value_to_depth)

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


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
  `shape` picks the object family: "head" (the built-in egg-shaped head with
  hair), "morph" (a low-rank linear face model cut at forehead and chin: no
  hair, ears or neck), "cat" (a round head with ears and a short muzzle) or
  "car" (a wide, low body with a cabin, deep relief and steep sides); `scale`
  magnifies the object in the frame (> 1: it is cut by the frame edges).
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
  shape: str = "head"  # head | morph | cat | car
  scale: float = 1.0

  def camera(self, size: int) -> render.Camera:
    return render.Camera(size, size, fov_deg=self.fov_deg,
                         min_depth=self.min_depth, max_depth=self.max_depth)

  def to_json(self) -> dict:
    # Fields added after data was first exported are left out at their
    # defaults, so existing meta.json files and TFDS config names stay as
    # they were.
    d = dataclasses.asdict(self)
    for name, default in _LATER_FIELDS.items():
      if d[name] == default:
        del d[name]
    return d

  @classmethod
  def from_json(cls, d: dict) -> "GenConfig":
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
         if k in {f.name for f in dataclasses.fields(cls)}}
    return cls(**d)

# Asymmetry amplitudes at asymmetry = 1 (see GenConfig).
_ASYM_DEPTH, _ASYM_ALBEDO = 0.01, 0.15
_ALBEDO_FAMILIES = ("skin", "blotch")
_SHAPE_FAMILIES = ("head", "morph", "cat", "car")
_LATER_FIELDS = dict(shape="head", scale=1.0)


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
    # Families and settings that break the head family's assumptions (issue 20).
    "morph": Variant(GenConfig(shape="morph", max_pitch_deg=15.0, max_roll_deg=8.0,
                               max_shift=0.01, ambient_range=(0.3, 0.6),
                               diffuse_range=(0.4, 0.8), max_light_dxy=0.6),
                     None, "a low-rank linear face model (20 components, mild expressions) "
                     "cut at forehead and chin, no hair; narrower in the frame, flatter; "
                     "pitch +-15, roll +-8, shift +-0.01, light from the front"),
    "frame": Variant(GenConfig(scale=1.3, max_pitch_deg=10.0), None,
                     "default heads magnified 1.3x: cut by the frame edges; pitch +-10"),
    "front_light": Variant(GenConfig(ambient_range=(0.3, 0.6), diffuse_range=(0.4, 0.8),
                                     max_light_dxy=0.25), None,
                           "light from the front only (|dx|, |dy| <= 0.25, <= 20 degrees "
                           "off axis): little shading cue"),
    "cat": Variant(GenConfig(shape="cat", max_pitch_deg=10.0, max_roll_deg=5.0), None,
                   "cat-like heads: ears, short muzzle, fur colours and stripes; "
                   "pitch +-10, roll +-5"),
    "car": Variant(GenConfig(shape="car", max_yaw_deg=45.0), None,
                   "car-like bodies: wide and low, cabin on top, deep relief with steep "
                   "flanks; yaw +-45"),
    "stress": Variant(GenConfig(max_pitch_deg=15.0, max_roll_deg=8.0, max_shift=0.02,
                                ambient_range=(0.3, 0.6), diffuse_range=(0.4, 0.8),
                                max_light_dxy=1.0, albedo="blotch"), None,
                      "wide_pose + harsh_light + the blotch albedo family together"),
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
  if cfg.shape not in _SHAPE_FAMILIES:
    raise UserError(f"GenConfig shape must be one of {', '.join(_SHAPE_FAMILIES)}, "
                    f"got {cfg.shape!r}")
  if cfg.shape != "head":
    # Drawn after everything else, so the head family's streams stay unchanged
    # (the head parameters above are drawn but unused by the other families).
    p.update(_FAMILY_PARAMS[cfg.shape](rng))
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
  if cfg.scale != 1.0:
    g = (g / np.float32(cfg.scale)).astype(np.float32)
  # u right (1xS), v down (Sx1), in [-1, 1]; fields broadcast to SxS.
  u, v = g[None, :], g[:, None]
  if cfg.shape != "head":
    depth, alb, mask, env = _FAMILY_FACE[cfg.shape](p, u, v)
    return _finish(depth, alb, mask, env, p, u, v, cfg)

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
  mix = _mix

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
  return _finish(depth, alb, mask, env, p, u, v, cfg)


def _mix(img, col, alpha):
  """Paints colour `col` over `img` with opacity `alpha` (clipped to [0, 1])."""
  alpha = np.clip(alpha, 0.0, 1.0)[..., None]
  return img * (1 - alpha) + np.asarray(col)[None, None] * alpha


def _finish(depth, alb, mask, env, p, u, v, cfg):
  """What every family shares: exact symmetry of the albedo, the optional
  asymmetric perturbation (faded by `env`), the depth range."""
  alb = np.stack([_sym(alb[..., k]) for k in range(3)], axis=-1)
  if cfg.asymmetry:
    f = _antisym(_fourier(u, v, p["asym"]) * env)
    depth = depth + cfg.asymmetry * _ASYM_DEPTH * f
    alb = alb + cfg.asymmetry * _ASYM_ALBEDO * f[..., None]
  depth = np.clip(depth, cfg.min_depth, cfg.max_depth)
  return depth.astype(np.float32), np.clip(alb, 0.0, 1.0).astype(np.float32), mask


# ----------------------------------------------------------------------------
# Other object families (GenConfig.shape): the same (u, v) conventions as
# canonical_face; each returns (depth_SxS, albedo_SxSx3, mask_SxS, env_SxS),
# env in [0, 1] fading the asymmetric perturbation towards the outline.
# ----------------------------------------------------------------------------

_SKIN_LIGHT, _SKIN_DARK = np.array([0.92, 0.76, 0.64]), np.array([0.42, 0.28, 0.2])
_MORPH_MODES = 17  # random smooth modes, after 3 named ones: 20 shape components


@functools.lru_cache(maxsize=None)
def _morph_basis() -> np.ndarray:
  """The morph family's fixed random modes: each the sum of 3 mirrored Gaussian
  pairs (centre u >= 0, v, widths su, sv, signed amplitude), 17x3x5. Drawn
  from a fixed seed (not the sample's): the model is the same for every
  sample and, being continuous in (u, v), at every resolution."""
  r = np.random.default_rng(20261202)
  n = (_MORPH_MODES, 3)
  amp = r.choice([-1.0, 1.0], n) * r.uniform(0.5, 1.0, n)
  return np.stack([r.uniform(0.0, 0.8, n), r.uniform(-0.7, 0.8, n), r.uniform(0.1, 0.3, n),
                   r.uniform(0.1, 0.3, n), amp], axis=-1)


def _skin(rng) -> np.ndarray:
  t = rng.uniform(0.0, 1.0)
  return ((1 - t) * _SKIN_LIGHT + t * _SKIN_DARK) * rng.uniform(0.94, 1.06, size=3)


def _morph_params(rng) -> dict:
  U = rng.uniform
  return dict(
      m_coef=rng.normal(size=3 + _MORPH_MODES),  # standardised shape coefficients
      m_expr=U(0.0, 0.6, size=2),  # mild expressions: mouth open, smile
      m_zback=U(1.035, 1.045), m_skin=_skin(rng), m_tex=np.stack(
          [U(-3, 3, 8), U(-3, 3, 8), U(0, 2 * np.pi, 8), U(-1, 1, 8)], axis=1),
      # Mirrored blotches: centre u >= 0, v, sizes, relative tone change.
      m_blotch=np.stack([U(0.1, 0.55, 5), U(-0.6, 0.7, 5), U(0.04, 0.14, 5),
                         U(0.04, 0.14, 5), U(-0.2, 0.2, 5)], axis=1),
      m_brow=U(0.4, 0.8), m_eye=U(0.5, 0.85), m_lip=U(0.55, 0.85))


def _morph_face(p, u, v):
  """A low-rank linear face model: mean face + 20 shape components (3 named:
  width / nose length / nose height, 17 smooth random modes) + 2 mild
  expressions, on a face mesh cut at the forehead and under the chin (no
  hair, ears or neck: the silhouette is the face's own contour). Flatter and
  narrower in the frame than the head family: half-width ~0.69 of the frame,
  relief ~0.085 depth units."""
  c = p["m_coef"]
  w = 0.69 * (1 + 0.05 * c[0])  # half-width in u
  v_top, v_chin, v_mid = -0.78, 0.86 + 0.03 * c[1], 0.1
  x = u / w
  upper = (v < v_mid) & (v > v_top) & (np.abs(x) < 1 - 0.15 * ((v_mid - v) / (v_mid - v_top)) ** 2)
  lower_r = np.abs(x) ** 2.2 + ((v - v_mid) / (v_chin - v_mid)) ** 2
  mask = upper | ((v >= v_mid) & (lower_r < 1))
  # Cross profile: a flat front falling off steeply at the sides; the lower
  # face recedes towards the cut under the chin; the forehead cut is a cliff.
  across = np.clip(1 - np.abs(x) ** 3, 0, 1) ** 0.6
  down = np.where(v >= v_mid, np.clip(1 - ((v - v_mid) / (v_chin - v_mid)) ** 2, 0, 1) ** 0.35,
                  1.0 - 0.25 * np.clip((v_mid - v) / (v_mid - v_top), 0, 1) ** 2)
  h = 0.048 * across * down
  env = _smoothstep(np.minimum(across, down) / 0.6)
  # Named features (nose from bridge to tip, eye sockets, brows, cheekbones,
  # lips, chin).
  tip = 0.2 + 0.04 * c[1]
  t = np.clip((v + 0.3) / (tip + 0.3), 0, 1)
  nose = (0.25 + 0.75 * t ** 1.3) * np.exp(-0.5 * (u / (0.07 * (1 + 0.6 * t))) ** 2)
  nose *= np.exp(-0.5 * (np.maximum(v - tip, 0) / 0.05) ** 2) * (v > -0.45)
  f = 0.036 * (1 + 0.12 * c[2]) * nose
  f -= 0.012 * _pair(u, v, 0.33, -0.25, 0.13, 0.09)
  f += 0.006 * _pair(u, v, 0.3, -0.42, 0.16, 0.05)
  f += 0.008 * _pair(u, v, 0.42, 0.05, 0.12, 0.12)
  mv = tip + 0.25
  f += 0.006 * (_gauss(u, v, 0, mv - 0.04, 0.17, 0.04) + _gauss(u, v, 0, mv + 0.05, 0.15, 0.04))
  f += 0.008 * _gauss(u, v, 0, mv + 0.3, 0.18, 0.08)
  for k, modes in enumerate(_morph_basis()):
    sd = 0.006 / (1 + k / 4)  # decaying component variance, as a PCA spectrum
    f += sd * c[3 + k] * sum(a * _pair(u, v, cu, cv, su, sv) for cu, cv, su, sv, a in modes)
  e_open, e_smile = p["m_expr"]
  f -= 0.008 * e_open * _gauss(u, v, 0, mv + 0.01, 0.11, 0.03)
  f += 0.006 * e_smile * _pair(u, v, 0.28, mv - 0.06, 0.1, 0.08)
  depth = _sym(p["m_zback"] - (h + env * f))
  # Symmetric skin with mirrored blotches, darker brows, eyes and lips.
  alb = p["m_skin"][None, None] * (1.0 + 0.05 * _fourier(u, v, p["m_tex"]))[..., None]
  for bu, bv, su, sv, tone in p["m_blotch"]:
    alb = alb * (1 + tone * _pair(u, v, bu, bv, su, sv))[..., None]
  alb = _mix(alb, p["m_skin"] * 0.35, p["m_brow"] * _pair(u, v, 0.3, -0.43, 0.12, 0.03))
  alb = _mix(alb, np.array([0.12, 0.1, 0.09]), p["m_eye"] * _pair(u, v, 0.33, -0.25, 0.06, 0.025))
  lip = p["m_skin"] * np.array([0.95, 0.6, 0.62])
  alb = _mix(alb, lip, p["m_lip"] * _gauss(u, v, 0, mv, 0.16, 0.045))
  alb = _mix(alb, lip * 0.3, e_open * _gauss(u, v, 0, mv + 0.01, 0.11, 0.015))
  return depth, alb, mask, env


_FUR = np.array([[0.85, 0.5, 0.2], [0.55, 0.55, 0.55], [0.12, 0.11, 0.1], [0.9, 0.82, 0.68]])


def _cat_params(rng) -> dict:
  U = rng.uniform
  return dict(
      c_a=U(0.68, 0.8), c_b=U(0.58, 0.68), c_cy=U(0.12, 0.22), c_dome=U(0.045, 0.06),
      c_ear_u=U(0.38, 0.48), c_ear_top=U(0.22, 0.32), c_ear_w=U(0.16, 0.22),
      c_muzzle=U(0.025, 0.04), c_muzzle_v=U(0.14, 0.22), c_zback=U(1.035, 1.05),
      c_fur=_FUR[rng.integers(len(_FUR))] * U(0.9, 1.1, size=3),
      c_stripes=U(0.0, 0.6), c_stripe_f=U(4.0, 7.0), c_white=float(U() < 0.5),
      c_eye=np.array([0.45, 0.7, 0.2]) * U(0.7, 1.3, size=3))


def _cat_face(p, u, v):
  """A cat-like head: a round dome, two pointed ears above it, a short muzzle
  with whisker pads; fur colour with optional tabby stripes and a white
  muzzle, slit-pupil eyes, a pink nose and ear insides."""
  a, b, cy = p["c_a"], p["c_b"], p["c_cy"]
  r2 = (u / a) ** 2 + ((v - cy) / b) ** 2
  head = r2 < 1
  # Ears: triangles with apex at (+-ear_u, cy - b - ear_top), base inside the dome.
  apex, base = cy - b - p["c_ear_top"], cy - 0.55 * b
  s = np.clip((v - apex) / (base - apex), 0, 1)
  ear_in = np.abs(np.abs(u) - p["c_ear_u"]) < p["c_ear_w"] * s
  ears = ear_in & (v > apex) & (v < base)
  mask = head | ears
  dome = p["c_dome"] * np.clip(1 - r2, 0, 1) ** 0.7
  ear_h = 0.014 * ears * (1 - 0.5 * s)
  h = np.maximum(dome, ear_h)
  env = _smoothstep(np.clip(1 - r2, 0, 1) / 0.4)
  mv = cy + p["c_muzzle_v"]
  f = p["c_muzzle"] * (_gauss(u, v, 0, mv, 0.2, 0.13) + 0.4 * _pair(u, v, 0.09, mv + 0.04, 0.08, 0.06))
  f += 0.006 * _gauss(u, v, 0, mv - 0.06, 0.04, 0.03)  # nose
  f -= 0.007 * _pair(u, v, 0.3, cy - 0.12, 0.1, 0.07)  # eye sockets
  depth = _sym(p["c_zback"] - (h + env * f))
  fur = p["c_fur"]
  stripes = p["c_stripes"] * (0.5 + 0.5 * np.cos(2 * np.pi * p["c_stripe_f"] * (v - cy)))
  stripes = stripes * (_gauss(u, v, 0, cy - 0.4, 0.22, 0.25) + _pair(u, v, 0.6, cy + 0.05, 0.15, 0.2))
  alb = fur[None, None] * (1 - 0.6 * stripes)[..., None] * np.ones_like(u + v)[..., None]
  alb = _mix(alb, np.array([0.93, 0.92, 0.9]), p["c_white"] * _gauss(u, v, 0, mv + 0.04, 0.24, 0.17))
  eye = _pair(u, v, 0.3, cy - 0.12, 0.075, 0.05)
  alb = _mix(alb, p["c_eye"], eye)
  alb = _mix(alb, np.array([0.05, 0.05, 0.05]), _pair(u, v, 0.3, cy - 0.12, 0.015, 0.045))
  alb = _mix(alb, np.array([0.85, 0.5, 0.55]), _gauss(u, v, 0, mv - 0.06, 0.045, 0.03))
  inner = ears & (np.abs(np.abs(u) - p["c_ear_u"]) < 0.5 * p["c_ear_w"] * s) & (s > 0.2)
  alb = _mix(alb, np.array([0.85, 0.6, 0.6]), 0.8 * inner)
  return depth, alb, mask, env


def _car_params(rng) -> dict:
  U = rng.uniform
  return dict(
      k_bw=U(0.85, 0.95), k_vb=U(-0.05, 0.05), k_vbot=U(0.45, 0.55), k_cw=U(0.6, 0.7),
      k_taper=U(0.7, 0.8), k_vc=U(-0.5, -0.4), k_front=U(0.11, 0.14), k_zback=U(1.05, 1.06),
      k_paint=U(0.1, 0.9, size=3), k_light_u=U(0.55, 0.7))


def _car_face(p, u, v):
  """A car-like body seen from the front: wide and low, a cabin with a raked
  windscreen on top, a hood sloping back to it; deep relief (~0.13) with
  steep sides, so turned views show the flanks. Paint colour, dark glass and
  grille, bright headlights, black tyres at the lower corners."""
  bw, vb, vbot, vc = p["k_bw"], p["k_vb"], p["k_vbot"], p["k_vc"]
  vm, hb = (vb + vbot) / 2, (vbot - vb) / 2
  body = (np.abs(u) / bw) ** 6 + (np.abs(v - vm) / hb) ** 6 < 1
  tcab = np.clip((v - vc) / (vb - vc), 0, 1)
  cab_w = p["k_cw"] * (p["k_taper"] + (1 - p["k_taper"]) * tcab)
  cabin = (v > vc) & (v <= vb + 0.02) & (np.abs(u) < cab_w)
  mask = body | cabin
  side = np.clip(1 - (np.abs(u) / bw) ** 8, 0, 1) ** 0.4
  hood = 0.72 + 0.28 * _smoothstep((v - vb) / 0.18)
  h_body = p["k_front"] * side * hood * body
  side_c = np.clip(1 - (np.abs(u) / np.maximum(cab_w, 1e-3)) ** 8, 0, 1) ** 0.4
  h_cab = p["k_front"] * 0.6 * side_c * (1 - 0.35 * (1 - tcab)) * cabin
  h = np.maximum(h_body, h_cab)
  env = _smoothstep(side / 0.5)
  depth = _sym(p["k_zback"] - h)
  alb = p["k_paint"][None, None] * np.ones_like(u + v)[..., None]
  glass = cabin & (v > vc + 0.05) & (np.abs(u) < 0.85 * cab_w) & (v < vb - 0.02)
  alb = _mix(alb, np.array([0.15, 0.18, 0.22]), 0.9 * glass)
  grille = (np.abs(u) < 0.35) & (np.abs(v - (vb + 0.24)) < 0.06)
  alb = _mix(alb, np.array([0.08, 0.08, 0.09]), 0.9 * grille)
  alb = _mix(alb, np.array([0.95, 0.95, 0.85]), _pair(u, v, p["k_light_u"], vb + 0.13, 0.08, 0.04))
  alb = _mix(alb, np.array([0.5, 0.5, 0.52]), 0.8 * (np.abs(v - (vbot - 0.07)) < 0.03) * body)
  alb = _mix(alb, np.array([0.04, 0.04, 0.04]), 0.95 * _pair(u, v, 0.72, vbot - 0.03, 0.11, 0.05))
  return depth, alb, mask, env


_FAMILY_PARAMS = dict(morph=_morph_params, cat=_cat_params, car=_car_params)
_FAMILY_FACE = dict(morph=_morph_face, cat=_cat_face, car=_car_face)


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
  with open(path, encoding="utf-8-sig") as fh:
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
    cliutil.log(f"note: {path}: not used with crop={crop} (a crop changes the camera)")
    return None
  meta_path = os.path.join(root, "meta.json")
  if camera is not None and os.path.isfile(meta_path):
    with open(meta_path, encoding="utf-8-sig") as fh:
      gen = GenConfig.from_json(json.load(fh).get("config", {}))
    if (gen.fov_deg, gen.min_depth, gen.max_depth) != (
        camera.fov_deg, camera.min_depth, camera.max_depth):
      cliutil.log(f"note: {path}: not used, the data's camera (fov {gen.fov_deg}, depth "
                  f"{gen.min_depth}-{gen.max_depth}) differs from the model's")
      return None
  try:
    with np.load(path) as z:
      arr = {k: z[k] for k in z.files}
  except Exception as e:  # a damaged sidecar only costs the diagnostics
    cliutil.log(f"note: {path}: unreadable ({type(e).__name__}), diagnostics skipped")
    return None
  index = {str(n): i for i, n in enumerate(arr["names"])}
  missing = [n for n in names if str(n) not in index]
  if missing:
    cliutil.log(f"note: {path}: no entry for {missing[0]} ({len(missing)} in all), diagnostics "
                "skipped")
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
