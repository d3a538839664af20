"""Face detection for `predict --detect-faces`: OpenCV's bundled Haar cascades.

opencv-python-headless 4.x ships the frontal human face and frontal cat face
cascades in `cv2.data.haarcascades` (the 5.0 wheels do not: requirements pin
4.x). A detection is turned into the square crop the training data was cut
with: Unsup3D's demo rule on the detector's box (side = 1.1 x the mean of the
box's width and height, centred on the box, moved down by 0.075 x side;
`FACE_CROP_SCALE`, `FACE_CROP_DOWN`), with the border replicated where the
square reaches past the photo (as Unsup3D's CelebA crop does).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from scr_jax.errors import UserError

# (kind, cascade file in cv2.data.haarcascades); the largest detection of any
# kind wins.
CASCADES = (("human", "haarcascade_frontalface_default.xml"),
            ("cat", "haarcascade_frontalcatface_extended.xml"))
FACE_CROP_SCALE = 1.1   # crop side / mean(box width, box height)
FACE_CROP_DOWN = 0.075  # centre shift down, as a fraction of the crop side
MIN_FACE_PX = 24        # the cascades' window: smaller faces are not found
_SCALE_STEP, _MIN_NEIGHBOURS = 1.1, 5


def _cv2():
  try:
    import cv2
  except ImportError as e:
    raise UserError(f"--detect-faces needs OpenCV: pip install opencv-python-headless==4.* "
                    f"({e})") from None
  return cv2


@functools.lru_cache(maxsize=None)
def _cascade(filename: str):
  cv2 = _cv2()
  path = os.path.join(getattr(cv2.data, "haarcascades", ""), filename)
  if not os.path.isfile(path):
    raise UserError(f"OpenCV {cv2.__version__} has no {filename} (the 5.x wheels dropped the "
                    "Haar cascades): pip install opencv-python-headless==4.*")
  clf = cv2.CascadeClassifier(path)
  if clf.empty():
    raise UserError(f"{path}: OpenCV could not load this cascade")
  return clf


def check_available():
  """Raises UserError unless OpenCV and every cascade of CASCADES load."""
  for _, filename in CASCADES:
    _cascade(filename)


def detect_faces(img_HxWx3) -> list:
  """Frontal human and cat faces in an RGB image.

  Args:
    img_HxWx3: float in [0, 1] or uint8.
  Returns:
    list of dict(kind='human'|'cat', box=(x, y, w, h) in pixels, top-left
    origin), largest first; empty when none is found.
  """
  cv2 = _cv2()
  a = np.asarray(img_HxWx3)
  if a.dtype != np.uint8:
    a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
  # No histogram equalisation: on a face in front of a flat background it
  # stretches the background's few levels and the cascades stop firing.
  gray = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
  found = []
  for kind, filename in CASCADES:
    boxes = _cascade(filename).detectMultiScale(
        gray, scaleFactor=_SCALE_STEP, minNeighbors=_MIN_NEIGHBOURS,
        minSize=(MIN_FACE_PX, MIN_FACE_PX))
    found += [dict(kind=kind, box=tuple(int(v) for v in b)) for b in boxes]
  return sorted(found, key=lambda f: -f["box"][2] * f["box"][3])


def face_crop_box(box) -> tuple:
  """Square crop (left, top, side) in pixels around a detector box (x, y, w, h).

  side = FACE_CROP_SCALE * (w + h) / 2; centre = box centre moved down by
  FACE_CROP_DOWN * side. The square may reach past the image
  (`data.crop_box_resize` replicates the border there).
  """
  x, y, w, h = box
  side = max(1, int(round(FACE_CROP_SCALE * (w + h) / 2)))
  cx = x + w / 2
  cy = y + h / 2 + FACE_CROP_DOWN * side
  return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def find_face(img_HxWx3):
  """The largest face and its crop: dict(kind, box, crop=(left, top, side)), or None."""
  faces = detect_faces(img_HxWx3)
  if not faces:
    return None
  return dict(faces[0], crop=face_crop_box(faces[0]["box"]))
