"""Pictures: reconstructions, normal maps, textureless shading, turn-table GIFs and MP4s."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from scr_jax import render
from scr_jax.errors import UserError


def to_uint8(x):
  return (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def normal_to_rgb(normal_HxWx3):
  """Unit normals -> RGB in [0, 1] (x right = red, y up = green, towards the
  camera = blue; our normals point away from the camera, so z is negated)."""
  n = np.asarray(normal_HxWx3)
  return np.stack([n[..., 0], -n[..., 1], -n[..., 2]], -1) * 0.5 + 0.5


def save_png(path, img_HxWxC, scale: int = 1):
  im = Image.fromarray(to_uint8(img_HxWxC))
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  im.save(path)


@functools.partial(jax.jit, static_argnames=("cam", "n_frames", "max_yaw_deg", "textured"))
def turntable(canon_depth_HxW, canon_image_HxWx3, cam, n_frames=24, max_yaw_deg=40.0,
              textured=True):
  """Frames of the canonical surface turning left-right about the pivot.

  Untextured frames use a grey albedo lit from the front-left, which shows the
  shape alone. Returns n_frames x H x W x 3 in [0, 1], black background.
  """
  yaws = jnp.deg2rad(max_yaw_deg) * jnp.sin(jnp.linspace(0, 2 * jnp.pi, n_frames, endpoint=False))
  if not textured:
    normal = render.depth_to_normals(canon_depth_HxW, cam)
    shading = render.shade(normal, 0.3, 0.7, jnp.asarray([-0.4, -0.3]))
    canon_image_HxWx3 = jnp.repeat(shading[..., None], 3, -1) * 0.85

  def frame(yaw):
    view = jnp.zeros(6).at[1].set(yaw)
    return render.render_view(canon_depth_HxW, canon_image_HxWx3, view, cam)["image"]

  return jnp.clip(jax.lax.map(frame, yaws), 0, 1)


def save_gif(path, frames_NxHxWx3, scale: int = 2, ms: int = 80):
  ims = [Image.fromarray(to_uint8(f)) for f in frames_NxHxWx3]
  if scale > 1:
    ims = [im.resize((im.width * scale, im.height * scale), Image.BILINEAR) for im in ims]
  ims[0].save(path, save_all=True, append_images=ims[1:], duration=ms, loop=0)


def grid(rows):
  """Stacks a list of rows (lists of HxWx3 arrays in [0, 1]) into one image."""
  return np.concatenate([np.concatenate([np.asarray(x) for x in r], 1) for r in rows], 0)


def gray(x_HxW, lo=None, hi=None):
  x = np.asarray(x_HxW, np.float32)
  lo = x.min() if lo is None else lo
  hi = x.max() if hi is None else hi
  return np.repeat(((x - lo) / max(hi - lo, 1e-8))[..., None], 3, -1)


def turntable_video_frames(canon_depth_HxW, canon_image_HxWx3, cam, size: int = 256,
                           n_frames: int = 48, max_yaw_deg: float = 40.0):
  """Larger turn-table: [textured | shape] side by side, rendered at `size` px.

  The canonical depth and image are resized (bilinear) to size x size and
  rendered with the same field of view, so the frames are real renders at
  that size, not enlarged small frames. Returns uint8 n_frames x size x
  2*size x 3.
  """
  big = render.Camera(size, size, cam.fov_deg, cam.min_depth, cam.max_depth,
                      cam.rot_center_depth)
  depth = jax.image.resize(jnp.asarray(canon_depth_HxW, jnp.float32), (size, size), "bilinear")
  image = jax.image.resize(jnp.asarray(canon_image_HxWx3, jnp.float32), (size, size, 3),
                           "bilinear")
  tex = turntable(depth, image, big, n_frames=n_frames, max_yaw_deg=max_yaw_deg)
  shape = turntable(depth, image, big, n_frames=n_frames, max_yaw_deg=max_yaw_deg,
                    textured=False)
  return to_uint8(jnp.concatenate([tex, shape], axis=2))


def save_mp4(path, frames_NxHxWx3, fps: int = 12) -> int:
  """Writes frames (uint8 or float in [0, 1], RGB) as an MPEG-4 video with
  OpenCV's VideoWriter ('mp4v', the encoder its wheels carry). Returns the
  number of frames written. Raises UserError if OpenCV cannot write it."""
  try:
    import cv2
  except ImportError as e:
    raise UserError(f"MP4 export needs OpenCV: pip install opencv-python-headless==4.* ({e})"
                    ) from None
  frames = np.asarray(frames_NxHxWx3)
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  n, h, w = frames.shape[:3]
  if h % 2 or w % 2:  # the encoder would silently drop the odd row / column
    raise UserError(f"{path}: MP4 frames need an even width and height, got {w}x{h}")
  writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
  if not writer.isOpened():
    raise UserError(f"{path}: OpenCV {cv2.__version__} could not open an mp4v video writer")
  try:
    for f in frames:
      writer.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
  finally:
    writer.release()
  return n
