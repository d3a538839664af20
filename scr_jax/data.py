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
from PIL import Image, UnidentifiedImageError

from scr_jax import render
from scr_jax.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# Unsup3D's depth PNG mapping (fixed, independent of the camera range).
_PNG_DEPTH_MID, _PNG_DEPTH_HALF = 1.0, 0.1


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """Generator parameters (everything but size, counts and seed).

  Angles in degrees; `max_shift` is the x/y translation range in metric units.
  `asymmetry` scales an antisymmetric perturbation: 0 gives canonical depth
  and albedo that equal their left-right flip exactly; at 1 the depth differs
  from its flip by up to 2 * 0.01 and the albedo by up to 2 * 0.15.
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

  # Albedo: skin with a smooth texture, blush, hair, brows, eyes, lips.
  tex = 1.0 + p["tex_amp"] * _fourier(u, v, p["tex"])
  alb = p["skin"][None, None] * tex[..., None]
  blush = p["blush"] * _pair(u, v, p["cheek_u"], cheek_v, 0.14, 0.12)
  alb = alb + blush[..., None] * np.array([1.0, -0.5, -0.5])

  def mix(img, col, alpha):
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    return img * (1 - alpha) + np.asarray(col)[None, None] * alpha

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
  """Writes generated splits as DIR/{split}/{image,depth}/NNNNNN_{image,depth}.png
  plus DIR/meta.json. Returns the meta dict.

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
              depth_png="z = 1.0 + 0.1 * ((1 - v) * 2 - 1), v in [0, 1]")
  os.makedirs(out_dir, exist_ok=True)
  tty = sys.stdout.isatty()
  cr = "\r" if tty else ""
  for split in SPLITS:
    img_dir = os.path.join(out_dir, split, "image")
    dep_dir = os.path.join(out_dir, split, "depth")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(dep_dir, exist_ok=True)
    t0, done = time.time(), 0
    for batch in iter_split(counts[split], size, seed, split, cfg):
      for img, z, name in zip(batch["images"], batch["depth"], batch["names"]):
        Image.fromarray(img).save(os.path.join(img_dir, f"{name}_image.png"))
        _save_depth_png(os.path.join(dep_dir, f"{name}_depth.png"), z, depth_bits)
      done += len(batch["names"])
      if verbose and tty:  # a live counter only where \r works (not in logs)
        print(f"\r[export] {split}: {done}/{counts[split]}", end="", flush=True)
    if verbose:
      print(f"{cr}[export] {split}: {done} samples {size}x{size} in "
            f"{time.time() - t0:.1f}s -> {os.path.join(out_dir, split)}", flush=True)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


# ----------------------------------------------------------------------------
# Reading images safely
# ----------------------------------------------------------------------------

def _open_image(path: str) -> Image.Image:
  """Opens and fully decodes an image; any failure is a one-line UserError."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: file not found")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: empty file (0 bytes)")
  img = None
  try:
    img = Image.open(path)
    img.load()  # PIL decodes lazily: truncation only shows up here
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    if img is not None:
      img.close()
    if isinstance(e, UnidentifiedImageError):
      why = "unknown format or corrupt header"
    else:
      why = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path}: not a readable image ({why})") from None
  return img


def _to_rgb_float(img: Image.Image) -> np.ndarray:
  """Any PIL image -> float32 HxWx3 in [0, 1].

  Grayscale is replicated to 3 channels; alpha is dropped (RGBA, LA);
  palette images are expanded; 16-bit grayscale is scaled by 1/65535.
  """
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(img, np.float32) / 65535.0
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if img.mode == "F":
    a = np.asarray(img, np.float32)
    return np.repeat(np.clip(a, 0, 1)[..., None], 3, axis=-1)
  if img.mode != "RGB":
    img = img.convert("RGB")
  return np.asarray(img, np.float32) / 255.0


def _to_png_value(img: Image.Image, path: str) -> np.ndarray:
  """Depth PNG -> v in [0, 1]: 16-bit grayscale / 65535, 8-bit channel 0 / 255."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    return np.asarray(img, np.float32) / 65535.0
  if img.mode in ("L", "RGB", "RGBA", "LA", "P"):
    a = np.asarray(img.convert("RGB") if img.mode == "P" else img, np.float32)
    return (a[..., 0] if a.ndim == 3 else a) / 255.0
  raise UserError(f"{path}: unsupported depth PNG mode {img.mode} "
                  "(expected 16-bit grayscale or 8-bit gray/RGB)")


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


def crop_resize(a_HxWxC: np.ndarray, image_size, crop=None, path: str = "array"):
  """Centre-crop to `crop` px (None: largest square), then bilinear resize to
  image_size (None: keep). Works on HxW or HxWxC float arrays."""
  h, w = a_HxWxC.shape[:2]
  left, top, side = _crop_box(w, h, crop, path)
  a = a_HxWxC[top:top + side, left:left + side]
  if image_size is None or int(image_size) == side:
    return np.ascontiguousarray(a, np.float32)
  size = int(image_size)
  if size < 1:
    raise UserError(f"image_size must be positive, got {image_size}")
  if a.ndim == 2:
    return _resize_plane(a, size)
  return np.stack([_resize_plane(a[..., k], size) for k in range(a.shape[-1])], -1)


# ----------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------

def _note(notes: dict, path: str, img: Image.Image, image_size, crop):
  """Records a non-fatal conversion of an input image, reported by _report."""
  if img.mode != "RGB":
    notes.setdefault(f"mode {img.mode}, converted to RGB", []).append(path)
  if image_size is not None and crop is None and img.size != (int(image_size),) * 2:
    notes.setdefault(f"not {image_size}x{image_size}, centre-cropped and resized",
                     []).append(f"{path} ({img.size[0]}x{img.size[1]})")


def _note_ignored(notes: dict, folder: str, suffixes):
  """Records the files of a folder that a loader skips (wrong name/extension)."""
  for f in sorted(os.listdir(folder)):
    if os.path.isfile(os.path.join(folder, f)) and not f.lower().endswith(tuple(suffixes)):
      notes.setdefault(f"not {' / '.join('*' + x for x in suffixes)}, ignored",
                       []).append(os.path.join(folder, f))


def _report(notes: dict):
  """One stderr line per kind of conversion, naming the first file."""
  for what, paths in notes.items():
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    print(f"note: {paths[0]}{more}: {what}", file=sys.stderr, flush=True)


def _list_files(folder: str, suffixes) -> list:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(tuple(suffixes))
                and os.path.isfile(os.path.join(folder, f)))


def load_synface(root: str, split: str = "train", image_size=64, crop=None,
                 limit=None) -> dict:
  """Reads DIR/{split}/{image,depth}/*_{image,depth}.png.

  Optional centre crop to `crop` px (None: the largest centred square, a no-op
  for square images) then bilinear resize to image_size (None: keep), images
  and metric depth alike. Returns dict: images float32 NxHxWx3 in [0, 1],
  depth float32 NxHxW (metric z), names ["NNNNNN", ...] (sorted). Depth PNGs
  may be 16-bit grayscale or 8-bit (channel 0 of RGB is used).
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
    im, dm = _open_image(ip), _open_image(dp)
    if im.size != dm.size:
      raise UserError(f"{dp}: depth is {dm.size[0]}x{dm.size[1]} but its image "
                      f"{ip} is {im.size[0]}x{im.size[1]}")
    _note(notes, ip, im, image_size, crop)
    images.append(crop_resize(_to_rgb_float(im), image_size, crop, ip))
    # Resize in metric units, not PNG values (the same here: the map is affine).
    z = png_value_to_depth(_to_png_value(dm, dp))
    depths.append(crop_resize(z, image_size, crop, dp))
  _report(notes)
  return dict(images=np.stack(images), depth=np.stack(depths), names=names)


def load_image_folder(dir_or_files, image_size=64, crop=None, limit=None) -> dict:
  """Reads an image-only folder (*.png, *.jpg, *.jpeg, sorted) or a list of files.

  Grayscale images are replicated to RGB, palette images expanded and alpha
  channels dropped. Centre crop to `crop` px (None: the largest centred
  square), then bilinear resize to image_size (None: keep). Returns dict:
  images float32 NxHxWx3 in [0, 1], names (file names without extension).
  """
  if isinstance(dir_or_files, (str, os.PathLike)):
    folder = os.fspath(dir_or_files)
    if not os.path.isdir(folder):
      raise UserError(f"{folder}: image folder not found")
    files = [os.path.join(folder, f) for f in _list_files(folder, IMAGE_EXTS)]
    if not files:
      raise UserError(f"{folder}: no *.png / *.jpg / *.jpeg files")
  else:
    files = [os.fspath(f) for f in dir_or_files]
    if not files:
      raise UserError("load_image_folder: empty file list")
  files = files[:limit]
  images, notes = [], {}
  if isinstance(dir_or_files, (str, os.PathLike)):
    _note_ignored(notes, os.fspath(dir_or_files), IMAGE_EXTS)
  for f in files:
    img = _open_image(f)
    _note(notes, f, img, image_size, crop)
    images.append(crop_resize(_to_rgb_float(img), image_size, crop, f))
  _report(notes)
  names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  return dict(images=np.stack(images), names=names)


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
  """Lazy alias of tfds_synface.build_tfds."""
  return _tfds_module().build_tfds(data_dir, size, n_train, n_val, n_test, seed, **kw)


def load_tfds(data_dir: str, split: str = "train", image_size=None, crop=None, **kw):
  """Lazy alias of tfds_synface.load_tfds."""
  return _tfds_module().load_tfds(data_dir, split, image_size, crop, **kw)


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
