"""Predict on images (the `predict` command): read, crop and resize every
input first (a bad one is a one-line error, or skipped and named), check every
output name, then run the trained model once per image and write pictures,
depth as numbers, albedo, light, view, a textured mesh and turn-tables into
OUT/<stem>/ (`export`)."""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np

from scr_jax import (data, detect, export, folders, model, runlog, structure, visualize,
                     workdir as workdir_lib)
from scr_jax.cliutil import log as _log
from scr_jax.errors import UserError


def parse_crop(spec) -> "str | int":
  """--crop: 'none' (largest centred square), 'train' (the run's crop) or N px.
  Raises UserError otherwise."""
  spec = str(spec).strip().lower()
  if spec in ("none", "train"):
    return spec
  try:
    n = int(spec)
  except ValueError:
    n = 0
  if n < 1:
    raise UserError(f"--crop takes none, train or a positive number of pixels, got {spec!r}")
  return n


def read_inputs(images, out, cfg, notes, crop="none", detect_faces=False, skip_bad=False,
                recursive=True):
  """Reads, crops and resizes every input before any model work.

  images: files and/or folders (folders listed recursively unless
    recursive=False; files under `out` are not inputs).
  Returns (kept, skipped, lines): kept = [(path, image_SxSx3, source dict)],
  skipped = [one-line reasons], lines = notes to print once the outputs are
  checked (so that any error stays one line). Without skip_bad the first
  unreadable file (or impossible crop) raises its UserError. An input whose
  crop is blank or nearly one flat colour (`folders.flat_image`) gets a note
  naming it (source["input_check"]), or is skipped with skip_bad.
  """
  files = []
  for spec in images:
    if os.path.isdir(spec):
      files += data.list_images(spec, recursive, notes, exclude=[out])
    else:
      files.append(spec)
  crop = parse_crop(crop)
  if crop == "train":
    crop_px = cfg.crop or None
  else:
    crop_px = None if crop == "none" else crop
  if detect_faces:  # a missing OpenCV or cascade is no bad input: it stops here
    detect.check_available()
  kept, skipped = [], []
  for path in files:
    try:
      img = data.read_image(path, notes)
      h, w = img.shape[:2]
      src = dict(path=path, size_px=[w, h], face=None)
      face = None
      if detect_faces:
        face = detect.find_face(img)
        if face is None and skip_bad:
          raise UserError(f"{path}: no human or cat face found (--detect-faces)")
        if face is None:
          notes.setdefault("no human or cat face found, used the largest centred square",
                           []).append(path)
      if face is not None:
        left, top, side = face["crop"]
        x = data.crop_box_resize(img, left, top, side, cfg.image_size)
        src.update(method="face", crop_px=[left, top, side],
                   face=dict(kind=face["kind"], box_px=list(face["box"])))
        notes.setdefault("face found, cropped around it", []).append(
            f"{path} ({face['kind']} face at x={face['box'][0]} y={face['box'][1]} "
            f"w={face['box'][2]} h={face['box'][3]})")
      else:
        left, top, side = data._crop_box(w, h, crop_px, path)
        x = data.crop_resize(img, cfg.image_size, crop_px, path)
        src.update(method="centre square" if crop_px is None else f"centre crop {side} px",
                   crop_px=[left, top, side])
      src["crop_units"] = "[left, top, side] in pixels of the upright input"
      flat = _flat_crop(img, left, top, side, x)
      if flat is not None:
        if skip_bad:
          raise UserError(f"{path}: the model's input (after the crop) is {flat}")
        src["input_check"] = flat
        notes.setdefault("the model's input (after the crop) is blank or nearly one flat "
                         "colour: its depth, mesh and videos mean nothing (check the crop: "
                         "--crop, --detect-faces; --skip-bad skips such inputs)", []).append(
                             f"{path} ({flat})")
      kept.append((path, x, src))
    except UserError as e:
      if not skip_bad:
        raise
      skipped.append(str(e))
  lines = [f"note: skipped {e}" for e in skipped]
  if crop == "none" and cfg.crop and not detect_faces:
    lines.append(f"note: the model was trained on images centre-cropped to {cfg.crop} px; "
                 "predict uses each input's largest centred square (--crop train reuses the "
                 "training crop, --detect-faces crops around the face)")
  return kept, skipped, lines


def _flat_crop(img_HxWx3, left: int, top: int, side: int, x_SxSx3):
  """Why the crop that reaches the model is no picture (`folders.flat_image`),
  or None: judged on the model's input and on the crop at its own resolution
  (subsampled to <= 256 px), where thin content the resize blurs still counts."""
  region = img_HxWx3[max(top, 0):top + side, max(left, 0):left + side]
  k = max(1, max(region.shape[:2]) // 256)
  return folders.flat_image(x_SxSx3) or folders.flat_image(region[::k, ::k])


def predict(workdir: str, images, out: str, crop="none", detect_faces: bool = False,
            skip_bad: bool = False, recursive: bool = True, video_size: int = 256,
            candidate=None, outputs=None, video: bool = True, log=_log) -> dict:
  """Per input: pictures, depth as numbers, albedo, light and view, a textured
  mesh and turn-tables in OUT/<stem>/ (see scr_jax/export.py). Every input is
  read and every output name checked before the model is loaded; a progress
  line with the ETA goes to `log` every PROGRESS_S seconds.

  outputs: None / 'all', or a comma list of export.OUTPUTS names; video=False
    drops the videos (--no-video), most of the time per input.
  Returns dict(stems, files, skipped). Raises UserError: bad --out, video
  size, --outputs, crop, unreadable input (without skip_bad), no readable
  input, or a workdir that cannot be restored.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out}: exists and is not a folder")
  if video_size < 8 or video_size % 2:
    raise UserError(f"--video-size must be an even number >= 8, got {video_size}")
  files = export.parse_outputs(outputs, video)
  cfg = workdir_lib.load_config(workdir)  # sizes and crop only; weights come later
  notes = {}
  kept, skipped, lines = read_inputs(images, out, cfg, notes, crop, detect_faces, skip_bad,
                                     recursive)
  if not kept:
    raise UserError(f"no readable input among {len(skipped)} file(s); first: {skipped[0]}")
  stems = export.unique_stems([k[0] for k in kept])
  export.check_outputs(out, stems, [k[0] for k in kept], files)
  files, video_notes = export.video_plan(files)
  for line in lines + video_notes:
    log(line)
  data._report(notes)
  r = workdir_lib.restore(workdir).single(workdir, "predict", candidate)
  cfg, nets, params, st = r.cfg, r.nets, r.params, r.structure
  os.makedirs(out, exist_ok=True)
  cam = model.camera(cfg)
  fwd = structure.jit(lambda p, x, s: model.forward(nets, p, x, s, cfg))
  written = []
  progress = _Progress(len(kept), log)
  for (path, img, src), stem in zip(kept, stems):
    res = fwd(params, jnp.asarray(img[None]), st)
    o, f = res.orig, res.factors
    one = dict(canon_depth=o.canon_depth_BxSxS, canon_normal=o.canon_normal_BxSxSx3,
               recon_depth=o.recon_depth_BxSxS, recon_mask=o.recon_mask_BxSxS,
               ambient=f.ambient_B, diffuse=f.diffuse_B, light_dxy=f.light_dxy_Bx2,
               view=f.view_Bx6, recon=o.recon_image(),
               canon_im=jnp.clip(o.canon_image(), 0, 1),
               canon_albedo=jnp.clip(model.to_unit_range(f.albedo_BxSxSx3), 0, 1))
    one = {k: np.asarray(v[0]) for k, v in one.items()}
    one["input"] = img
    gif = None
    if "turn.gif" in files:
      gif = np.asarray(visualize.turntable(o.canon_depth_BxSxS[0], o.canon_image()[0], cam,
                                           textured=False))
    written += export.write_prediction(out, stem, one, cam, src, video_size=video_size,
                                       gif_frames=gif, files=files)
    progress.step()
  expected = len(files) * len(kept)
  on_disk = len({os.path.realpath(p) for p in written if os.path.isfile(p)})
  if on_disk != expected:
    raise UserError(f"{out}: {on_disk} distinct files on disk, expected {expected}")
  more = f"; skipped {len(skipped)} (named above)" if skipped else ""
  log(f"wrote {on_disk} files for {len(kept)} images to {out} (one folder each){more}")
  return dict(stems=stems, files=written, skipped=skipped)


PROGRESS_S = 10.0  # seconds between progress lines of a batch predict


class _Progress:
  """'[predict] 12/500 images (2%), 2.9 s/image, ETA 23m30s' after the first
  image, then every PROGRESS_S seconds and at the last (batches of 2+)."""

  def __init__(self, total: int, log):
    self.total, self.log, self.done = total, log, 0
    self.t0 = self.last = time.time()
    self.t1 = None  # after the first image, which also compiles: the rate is timed from here

  def step(self):
    self.done += 1
    now = time.time()
    if self.done == 1:
      self.t1 = now
    if self.total < 2 or not (self.done in (1, self.total) or now - self.last >= PROGRESS_S):
      return
    self.last = now
    per = (now - self.t0) if self.done == 1 else (now - self.t1) / (self.done - 1)
    eta = runlog._fmt_time(per * (self.total - self.done))
    self.log(f"[predict] {self.done}/{self.total} images ({100 * self.done // self.total}%), "
             f"{per:.1f} s/image, ETA {eta}")
