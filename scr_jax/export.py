"""What `predict` writes for each input: numbers, pictures, mesh, videos.

One folder per input, OUT/<stem>/, with `stem` unique over the inputs
(`unique_stems`), so no two inputs write the same file:

  input.png       the model's input (after the crop), 2x enlarged
  recon.png       reconstruction of the input, 2x
  normal.png      canonical normals (x red, y up green, towards the camera blue), 2x
  shading.png     canonical shape, textureless, lit from the front-left, 2x
  albedo.png      canonical albedo, RGB in [0, 1] (8-bit), model size
  canon_image.png canonical image (albedo x shading), the mesh texture
  canon_depth.npy canonical depth: float32 HxW, metric z in camera units
                  ([min_depth, max_depth], 0.9..1.1 by default)
  canon_depth.png the same, 16-bit grayscale in Unsup3D's mapping
                  v = (1.1 - z) / 0.2, stored round(v * 65535): step 3.05e-6
  depth.npy       input-view depth (the canonical surface rendered in the
                  predicted view): float32 HxW; pixels it does not cover hold
                  the camera's far value (max + (max - min) / 2 = 1.2)
  depth.png       the same, 16-bit, same mapping (clipped to [0.9, 1.1], so
                  uncovered pixels read 1.1)
  depth_mask.png  input-view pixels the surface covers (8-bit, 255)
  params.json     light, view, camera and preprocessing, with units
  mesh.obj + mesh.mtl + texture.png
                  canonical surface, one vertex per pixel, two triangles per
                  quad, textured with the canonical image; written by trimesh.
                  Frame: x right, y up, z towards the viewer, origin at the
                  rotation pivot (camera point (0, 0, rot_center_depth)):
                  (x, y, z)_obj = (x, -y, rot_center_depth - z)_camera
  turn.gif        today's small turn-table (shape only, 3x enlarged)
  turn.mp4        larger turn-table, [textured | shape], rendered at
                  `video_size` px per panel: H.264 where the installed OpenCV
                  encodes it (browsers play it), else MPEG-4 Part 2 ('mp4v':
                  VLC and most players, not browsers or slides)
  turn.webm       the same video in VP8 (or VP9) WebM, which browsers play,
                  where OpenCV writes it (OpenCV's pip wheels do)

`--outputs` picks groups of these (OUTPUTS; params.json is always written);
the video is most of the time per input.

The 16-bit depth PNGs are readable by `folders.read_depth_png`.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from scr_jax import folders, render, visualize
from scr_jax.errors import UserError

# Files each input gets (relative to OUT/<stem>/), in writing order.
FILES = ("input.png", "recon.png", "normal.png", "shading.png", "albedo.png",
         "canon_image.png", "canon_depth.npy", "canon_depth.png", "depth.npy", "depth.png",
         "depth_mask.png", "params.json", "mesh.obj", "mesh.mtl", "texture.png", "turn.gif",
         "turn.mp4", "turn.webm")
# `predict --outputs` names -> their files (params.json, the record, is always written).
OUTPUTS = {
    "input": ("input.png",), "recon": ("recon.png",), "normal": ("normal.png",),
    "shading": ("shading.png",), "albedo": ("albedo.png", "canon_image.png"),
    "depth": ("canon_depth.npy", "canon_depth.png", "depth.npy", "depth.png", "depth_mask.png"),
    "mesh": ("mesh.obj", "mesh.mtl", "texture.png"), "gif": ("turn.gif",),
    "video": ("turn.mp4", "turn.webm"),
}
DEPTH_PNG = "z = 1.1 - 0.2 * v, v = png / 65535 (Unsup3D's mapping; 16-bit)"


def unique_stems(paths) -> list:
  """Output names, one per input path, distinct even when base names clash.

  'a.png' alone -> 'a'. Clashing base names (compared case-insensitively, as
  on macOS and Windows) get their extension ('a.png', 'a.jpg' -> 'a_png',
  'a_jpg'); if that still clashes (in/a.png, other/a.png) the parent folders
  are prepended until the names differ ('in_a_png', 'other_a_png'); a
  remaining clash (the same file given twice) gets _2, _3, ...
  """
  paths = [os.path.normpath(os.fspath(p)) for p in paths]

  def name(p, level):
    parts = os.path.abspath(p).split(os.sep)[1:]
    stem, ext = os.path.splitext(parts[-1])
    if level == 0:
      return stem
    words = parts[-level:-1] + [stem, ext.lstrip(".")]
    return "_".join(w for w in words if w)

  def clashes(names):
    seen = {}
    for i, n in enumerate(names):
      seen.setdefault(n.casefold(), []).append(i)
    return [ids for ids in seen.values() if len(ids) > 1]

  levels = [0] * len(paths)
  max_level = max((len(os.path.abspath(p).split(os.sep)) for p in paths), default=1)
  names = [name(p, 0) for p in paths]
  for _ in range(max_level):
    groups = clashes(names)
    if not groups:
      break
    for ids in groups:
      for i in ids:
        levels[i] = min(levels[i] + 1, max_level)
        names[i] = name(paths[i], levels[i])
  out, used = [], set()
  for n in names:
    cand, k = n, 2
    while cand.casefold() in used:
      cand, k = f"{n}_{k}", k + 1
    used.add(cand.casefold())
    out.append(cand)
  return out


def parse_outputs(spec=None, video: bool = True) -> tuple:
  """The files `predict` writes per input, in FILES order.

  spec: None or 'all' (every output), or a comma list of OUTPUTS names
    ('depth,normal,mesh'); video=False (--no-video) drops the videos.
  Raises:
    UserError: an unknown name (one line listing the known ones).
  """
  names = list(OUTPUTS) if spec is None or str(spec).strip().lower() == "all" else [
      n.strip().lower() for n in str(spec).split(",") if n.strip()]
  bad = [n for n in names if n not in OUTPUTS]
  if bad or not names:
    raise UserError(f"--outputs {spec!r}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
                    f"give a comma list of {', '.join(OUTPUTS)} (or all)")
  if not video:
    names = [n for n in names if n != "video"]
  want = {"params.json"}.union(*(OUTPUTS[n] for n in names))
  return tuple(f for f in FILES if f in want)


def video_plan(files) -> tuple:
  """(files, notes): the videos among `files` this OpenCV can write (probed
  once, before any model work: `visualize.video_codec`), and a note for each
  video left out or not playable in browsers."""
  notes = []
  if not any(f.startswith("turn.") and not f.endswith(".gif") for f in files):
    return tuple(files), notes
  keep = []
  for f in files:
    ext = os.path.splitext(f)[1]
    if ext not in visualize.VIDEO_CODECS:
      keep.append(f)
      continue
    codec = visualize.video_codec(ext)
    if codec is None:
      notes.append(f"note: this OpenCV writes no {ext} video "
                   f"({', '.join(c for c, _ in visualize.VIDEO_CODECS[ext])}); {f} not written")
      continue
    keep.append(f)
    if ext == ".mp4" and codec[1] not in visualize.BROWSER_CODECS:
      web = "turn.webm (WebM) plays in browsers" if "turn.webm" in files and \
          visualize.video_codec(".webm") else "browsers need H.264"
      notes.append(f"note: turn.mp4 is {codec[1]} ('{codec[0]}'; VLC and most players, not "
                   f"browsers or slides): this OpenCV has no H.264 encoder; {web}")
  return tuple(keep), notes


def planned_files(out_dir: str, stem: str, files=FILES) -> list:
  return [os.path.join(out_dir, stem, f) for f in files]


def check_outputs(out_dir: str, stems, inputs, files=FILES):
  """Refuses, before any model work, outputs that would overwrite an input
  file or that cannot be written (--out or OUT/<stem> is a file)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir}: exists and is not a folder")
  ins = {os.path.realpath(p) for p in inputs}
  for stem in stems:
    d = os.path.join(out_dir, stem)
    if os.path.realpath(d) in ins or (os.path.exists(d) and not os.path.isdir(d)):
      raise UserError(f"{d}: exists and is not a folder (predict writes one folder per "
                      "input); choose another --out")
    for p in planned_files(out_dir, stem, files):
      if os.path.realpath(p) in ins:
        raise UserError(f"{p}: predict would overwrite this input file; choose another --out")


def save_depth_png16(path, z_HxW):
  """Metric depth -> 16-bit grayscale PNG in Unsup3D's mapping (see DEPTH_PNG)."""
  v = folders.depth_to_png_value(z_HxW)
  Image.fromarray(np.round(v * 65535).astype(np.uint16)).save(path)


def mesh_from_depth(canon_depth_HxW, texture_HxWx3, cam: render.Camera):
  """Textured trimesh.Trimesh of a canonical depth map (frame: module doc)."""
  try:
    import trimesh
  except ImportError as e:
    raise UserError(f"mesh export needs trimesh: pip install trimesh ({e})") from None
  h, w = np.shape(canon_depth_HxW)
  pts = np.asarray(render.depth_to_points(np.asarray(canon_depth_HxW, np.float32), cam),
                   np.float64).reshape(-1, 3)
  verts = np.stack([pts[:, 0], -pts[:, 1], cam.rot_center_depth - pts[:, 2]], axis=1)
  y, x = np.mgrid[0:h, 0:w]
  uv = np.stack([(x.ravel() + 0.5) / w, 1.0 - (y.ravel() + 0.5) / h], axis=1)
  material = trimesh.visual.material.SimpleMaterial(
      image=Image.fromarray(visualize.to_uint8(texture_HxWx3)), name="texture",
      ambient=(255, 255, 255, 255), diffuse=(255, 255, 255, 255))
  return trimesh.Trimesh(verts, np.asarray(render.grid_faces(h, w)),
                         visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
                         process=False)


def params_json(pred: dict, cam: render.Camera, source: dict) -> dict:
  """Light, view, camera and preprocessing of one prediction, with units."""
  ambient, diffuse = float(pred["ambient"]), float(pred["diffuse"])
  dxy = np.asarray(pred["light_dxy"], np.float64)
  direction = np.asarray(render.light_direction(dxy), np.float64)
  view = np.asarray(pred["view"], np.float64)
  rot = np.rad2deg(view[:3])
  return dict(
      source=source,
      light=dict(
          ambient=ambient, diffuse=diffuse, units="unitless intensities in [0, 1]",
          direction=direction.tolist(),
          direction_frame="unit vector in the camera frame (x right, y down, z forward)",
          angle_x_deg=float(np.rad2deg(np.arctan(dxy[0]))),
          angle_y_deg=float(np.rad2deg(np.arctan(dxy[1]))),
          angles="angles of the direction from the optical axis in the x-z and y-z planes",
          shading="ambient + diffuse * max(0, n . direction)"),
      view=dict(
          rotation_deg=dict(x_pitch=float(rot[0]), y_yaw=float(rot[1]), z_roll=float(rot[2])),
          translation=dict(x=float(view[3]), y=float(view[4]), z=float(view[5])),
          translation_units="camera units (the canonical depth spans min_depth..max_depth)",
          convention=f"P' = R (P - c) + c + t, R = Rz Ry Rx, c = (0, 0, {cam.rot_center_depth}); "
                     "camera x right, y down, z forward"),
      camera=dict(fov_deg=cam.fov_deg, image_size_px=cam.width, focal_px=float(cam.focal),
                  principal_point_px=[cam.cx, cam.cy], min_depth=cam.min_depth,
                  max_depth=cam.max_depth, rot_center_depth=cam.rot_center_depth,
                  far_depth=cam.far),
      depth_png=DEPTH_PNG,
      mesh_frame=f"x right, y up, z towards the viewer; (x, -y, {cam.rot_center_depth} - z) of "
                 "the camera frame")


def write_prediction(out_dir: str, stem: str, pred: dict, cam: render.Camera, source: dict,
                     video_size: int = 256, gif_frames=None, files=FILES) -> list:
  """Writes the files `files` (of FILES, default all) for one input into OUT/<stem>/.

  Args:
    pred: numpy arrays of one image: input_HxWx3, recon_HxWx3, canon_normal,
      canon_depth_HxW, canon_albedo_HxWx3 and canon_im_HxWx3 (both [0, 1]),
      recon_depth_HxW, recon_mask_HxW, ambient, diffuse, light_dxy, view.
    source: what params.json says about the input (path, crop, face).
    gif_frames: the small shape turn-table (N x H x W x 3 in [0, 1]); only
      needed for turn.gif.
  Returns:
    the paths written (those of `files`), each checked to exist.
  """
  d = os.path.join(out_dir, stem)
  os.makedirs(d, exist_ok=True)
  p = {f: os.path.join(d, f) for f in files}
  want = set(files)
  for name, img, scale in (("input.png", lambda: pred["input"], 2),
                           ("recon.png", lambda: pred["recon"], 2),
                           ("normal.png", lambda: visualize.normal_to_rgb(pred["canon_normal"]), 2),
                           ("albedo.png", lambda: pred["canon_albedo"], 1),
                           ("canon_image.png", lambda: pred["canon_im"], 1)):
    if name in want:
      visualize.save_png(p[name], img(), scale)
  if "shading.png" in want:
    shade = np.asarray(render.shade(pred["canon_normal"], 0.3, 0.7, np.asarray([-0.4, -0.3])))
    visualize.save_png(p["shading.png"], np.repeat(shade[..., None], 3, -1), 2)
  for stem_, key in (("canon_depth", "canon_depth"), ("depth", "recon_depth")):
    if f"{stem_}.npy" in want:
      np.save(p[f"{stem_}.npy"], np.asarray(pred[key], np.float32))
    if f"{stem_}.png" in want:
      save_depth_png16(p[f"{stem_}.png"], pred[key])
  if "depth_mask.png" in want:
    visualize.save_png(p["depth_mask.png"], np.repeat(
        (np.asarray(pred["recon_mask"]) > 0.5).astype(np.float32)[..., None], 3, -1))
  if "mesh.obj" in want:
    mesh = mesh_from_depth(pred["canon_depth"], pred["canon_im"], cam)
    mesh.export(p["mesh.obj"], mtl_name="mesh.mtl")
  if "turn.gif" in want:
    visualize.save_gif(p["turn.gif"], np.asarray(gif_frames), scale=3)
  videos = {}
  if {"turn.mp4", "turn.webm"} & want:
    frames = visualize.turntable_video_frames(pred["canon_depth"], pred["canon_im"], cam,
                                              size=video_size)
    for name in ("turn.mp4", "turn.webm"):
      if name in want:
        videos[name] = visualize.save_video(p[name], frames)
  meta = params_json(pred, cam, source)
  meta["files"] = list(files)
  if videos:
    meta["video_codecs"] = videos
  with open(p["params.json"], "w") as fh:
    json.dump(meta, fh, indent=1)
  missing = [f for f in files if not os.path.isfile(p[f])]
  if missing:
    raise UserError(f"{d}: {', '.join(missing)} not written (disk full or a library "
                    "changed its file names?)")
  return [p[f] for f in files]
