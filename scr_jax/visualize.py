"""Pictures: reconstructions, normal maps, textureless shading, turn-table GIFs and MP4s."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from scr_jax import render
from scr_jax.errors import UserError


def figure(width_in: float, height_in: float, dpi: int = 100):
  """The one matplotlib set-up: a `matplotlib.figure.Figure` of width_in x
  height_in inches with an Agg canvas attached (`fig.savefig(path)` writes a
  PNG). No pyplot: no global figure state and no backend switch, so it is
  safe in any process (tests, headless machines, threads); matplotlib is
  imported only here, when a plot is asked for."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width_in, height_in), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


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


# Codecs tried per container, browser-playable first: (OpenCV fourcc, name).
# OpenCV's pip wheels carry no H.264 encoder (avc1 then fails) but do write
# VP8 / VP9; VP8 first: it encodes ~4x faster, and browsers play both.
VIDEO_CODECS = {
    ".mp4": (("avc1", "H.264"), ("mp4v", "MPEG-4 Part 2")),
    ".webm": (("VP80", "VP8"), ("VP90", "VP9")),
}
BROWSER_CODECS = ("H.264", "VP9", "VP8")


def _cv2():
  try:
    import cv2
  except ImportError as e:
    raise UserError(f"video export needs OpenCV: pip install opencv-python-headless==4.* ({e})"
                    ) from None
  return cv2


@contextlib.contextmanager
def _quiet_stderr_fd():
  """FFmpeg inside OpenCV prints its failed encoder probes straight to fd 2."""
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def _write(cv2, path, fourcc, frames, fps) -> bool:
  n, h, w = frames.shape[:3]
  writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
  if not writer.isOpened():
    return False
  try:
    for f in frames:
      writer.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
  finally:
    writer.release()
  return True


def _frames_read(cv2, path) -> int:
  cap = cv2.VideoCapture(os.fspath(path))
  n = 0
  try:
    while cap.isOpened() and cap.read()[0]:
      n += 1
  finally:
    cap.release()
  return n


@functools.lru_cache(maxsize=None)
def video_codec(ext: str):
  """(fourcc, name) of the first codec in VIDEO_CODECS[ext] that this OpenCV
  both writes and reads back (a writer can open and still leave an empty
  file), probed once on a tiny clip; None when none works."""
  cv2 = _cv2()
  frames = np.zeros((4, 16, 32, 3), np.uint8)
  frames[:, :, :16] = 200
  with tempfile.TemporaryDirectory() as tmp:
    for fourcc, name in VIDEO_CODECS[ext]:
      path = os.path.join(tmp, f"probe_{fourcc}{ext}")
      with _quiet_stderr_fd():
        ok = _write(cv2, path, fourcc, frames, 12) and _frames_read(cv2, path) == len(frames)
      if ok:
        return fourcc, name
  return None


def save_video(path, frames_NxHxWx3, fps: int = 12) -> str:
  """Writes frames (uint8 or float in [0, 1], RGB) as a video whose container
  is the path's extension (.mp4, .webm), with the first codec of
  VIDEO_CODECS this OpenCV writes and reads back (`video_codec`). Returns the
  codec's name (e.g. 'H.264', 'MPEG-4 Part 2', 'VP8').

  Raises:
    UserError: odd frame sizes, no OpenCV, or no codec for the container.
  """
  cv2 = _cv2()
  frames = np.asarray(frames_NxHxWx3)
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  n, h, w = frames.shape[:3]
  if h % 2 or w % 2:  # the encoder would silently drop the odd row / column
    raise UserError(f"{path}: video frames need an even width and height, got {w}x{h}")
  ext = os.path.splitext(os.fspath(path))[1].lower()
  codec = video_codec(ext)
  if codec is None:
    raise UserError(f"{path}: OpenCV {cv2.__version__} can write none of "
                    f"{', '.join(c for c, _ in VIDEO_CODECS[ext])} into {ext}")
  with _quiet_stderr_fd():  # FFmpeg's note on the fourcc tag, at every write
    ok = _write(cv2, path, codec[0], frames, fps)
  if not ok:
    raise UserError(f"{path}: OpenCV {cv2.__version__} could not open a {codec[0]} video writer")
  return codec[1]


def save_mp4(path, frames_NxHxWx3, fps: int = 12) -> int:
  """`save_video` into an .mp4 (H.264 where this OpenCV encodes it, else
  MPEG-4 Part 2); returns the number of frames written."""
  save_video(path, frames_NxHxWx3, fps)
  return int(np.shape(frames_NxHxWx3)[0])
